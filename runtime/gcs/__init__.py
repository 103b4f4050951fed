"""The GCS (global control service), on the head node only: the node table,
job table, resource view and a small KV store shared by the whole cluster."""
