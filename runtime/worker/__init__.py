"""Worker processes: started by the raylet, run tasks pushed by core workers."""
