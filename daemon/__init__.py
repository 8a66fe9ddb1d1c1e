"""The service: RTSP cameras in, batched GPU inference, detections out over ZeroMQ."""
