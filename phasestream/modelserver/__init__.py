"""The model server: protocol, server (loads phasestream.models) and a client that needs only numpy and pyzmq."""
