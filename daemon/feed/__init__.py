"""The detection feed on ZeroMQ: the messages, the publisher, what subscribers may make it hold,
CURVE encryption, and the subscriber client."""
