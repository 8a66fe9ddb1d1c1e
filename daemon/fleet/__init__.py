"""Scale-out: cameras sharded over worker processes by rendezvous hashing, and the proxy that
joins the workers' feeds into one endpoint."""
