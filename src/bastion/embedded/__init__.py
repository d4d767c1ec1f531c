"""What ``bastion up`` runs on one machine: an embedded Redis and a process supervisor."""
