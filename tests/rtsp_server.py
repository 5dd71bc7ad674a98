"""A real RTSP camera for the agent's tests: GStreamer's gst-rtsp-server (Debian packages).

Run with the system Python, which has PyGObject (``python3-gi``), not the project's venv::

    /usr/bin/python3 tests/rtsp_server.py PORT      # PORT 0: any free port

Serves ``rtsp://127.0.0.1:PORT/cam``: a live 320x240 test pattern (a moving ball) at 15 frames/s,
JPEG over RTP (RFC 2435), which OpenCV's FFmpeg reads. Prints ``ready PORT`` once it listens.
Needs gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base (videotestsrc) and
gstreamer1.0-plugins-good (jpegenc, rtpjpegpay): ``make setup`` installs them.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=320,height=240,framerate=15/1 "
            "! jpegenc quality=85 ! rtpjpegpay name=pay0 pt=26 )")


def main() -> None:
    Gst.init(None)
    missing = [e for e in ("videotestsrc", "jpegenc", "rtpjpegpay") if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"missing GStreamer elements: {', '.join(missing)}", file=sys.stderr, flush=True)
        sys.exit(3)
    server = GstRtspServer.RTSPServer.new()
    server.set_address("127.0.0.1")
    server.set_service(sys.argv[1] if len(sys.argv) > 1 else "0")
    factory = GstRtspServer.RTSPMediaFactory.new()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print("cannot listen", file=sys.stderr, flush=True)
        sys.exit(4)
    print(f"ready {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
