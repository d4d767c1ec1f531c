"""The admin API's routes, one ``APIRouter`` per resource; ``bastion.control.app`` mounts them
under ``/admin/v1`` behind the principal check. Handlers stay thin: they parse, check grants and
hand each state change to the unit of work (``bastion.control.changes``)."""
