"""Services that own processes and sockets: 0MQ analysis worker, model server, Tiled helpers."""
