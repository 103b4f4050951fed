"""raytop: the cluster's terminal UI (a Textual app; ``raytop --help``)."""
