"""Parts of the edge benchmark (bench_edges.py): the stack, the victim, the raw wire, the findings."""
