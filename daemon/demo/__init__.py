"""`make demo` (`python -m codetr_stream.daemon.demo`) and the local RTSP cameras it serves: live
generated video through GStreamer's RTSP server (`rtsp_server`), or a clip replayed by a small
server of ours that needs only PyAV (`rtsp_replay`). The tests and benchmarks use the same
cameras."""
