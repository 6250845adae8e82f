"""A local GCS for the gs:// tests: `gcp-storage-emulator` (the GCS JSON API on 127.0.0.1), in
memory, with one bucket, served one thread per connection, plus two things real GCS has and the emulator lacks: the
`objects.moveTo` call (gcsfs renames with it, falling back to copy + delete only after ~30 s of
retries) and the `x-goog-generation` header on downloads (tensorstore's conditional writes of
orbax's OCDBT manifests fail with "Malformed StorageGeneration" without it).

    python tests/gcs_emulator.py PORT BUCKET      # serves until killed; prints `ready` when up

`emulator_env(port)` is what points every client at it: gcsfs and etils.epath through
STORAGE_EMULATOR_HOST, tensorstore (orbax's gs:// driver) through TENSORSTORE_GCS_HTTP_URL,
anonymous credentials, no metadata-server probe, and gcsfs without its gRPC bucket-type lookup
(the emulator has no gRPC endpoint; the lookup would wait a minute per bucket).
"""
import io
import sys
import threading
import time


def emulator_env(port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    return dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")


def _move(request, response, storage, *args, **kwargs):
    """POST b/{bucket}/o/{object}/moveTo/o/{dest}: copy, then delete the source."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    p = request.params
    try:
        dest = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],
                             p["bucket_name"], p["dest_object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects._delete(storage, p["bucket_name"], p["object_id"])
    response.json(dest)


def _with_generation(handler):
    """A download handler that also sends the object's generation headers, as GCS does
    (tensorstore's conditional writes, orbax's OCDBT manifests, read the generation there)."""
    def download(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:   # not found: the handler answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download


def main(port: int, bucket: str) -> None:
    import http.server

    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.handlers import objects

    # one thread per connection: the emulator's single-threaded server stalls every client
    # behind one idle keep-alive connection (tensorstore keeps several open). Requests are handled
    # one at a time (the in-memory storage is not thread-safe: concurrent uploads lose their
    # sessions), with the socket I/O outside the lock (the body read before, the response written
    # after), so a client that is slow to send or to read never holds the others up.
    server.server.HTTPServer = http.server.ThreadingHTTPServer
    lock, handle = threading.Lock(), server.Router.handle

    def serialised(router, method):
        request = router._request_handler
        sockets = request.rfile, request.wfile
        body = server._read_raw_data(request) or b""
        del request.headers["Transfer-Encoding"]
        del request.headers["Content-Length"]
        request.headers["Content-Length"] = str(len(body))
        request.rfile, request.wfile = io.BytesIO(body), io.BytesIO()
        try:
            with lock:
                handle(router, method)
            sockets[1].write(request.wfile.getvalue())
        finally:
            request.rfile, request.wfile = sockets

    server.Router.handle = serialised

    patched = {objects.download: _with_generation(objects.download),
               objects.get: _with_generation(objects.get)}
    route = (rf"^(?:{settings.API_ENDPOINT})?/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
             rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {server.POST: _move})
    server.HANDLERS = (route, *((regex, {m: patched.get(f, f) for m, f in methods.items()})
                                for regex, methods in server.HANDLERS))
    srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    srv.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])


def start(port: int, bucket: str, *, timeout: float = 30.0):
    """Start the emulator in a child process; returns it once it answers on 127.0.0.1:port.
    Raises RuntimeError naming the port and the emulator's stderr if it is not up in `timeout`
    seconds (no test then waits on a GCS that is not there)."""
    import subprocess
    import tempfile
    import urllib.request

    # its log goes to a file: a pipe nobody reads fills up and then blocks the emulator mid-request
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, __file__, str(port), bucket],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"the GCS emulator did not come up on 127.0.0.1:{port} in {timeout:.0f}s "
                       f"(is gcp-storage-emulator installed? `pip install gcp-storage-emulator`): "
                       f"{log.read()[-2000:]}")


def reachable(port: int) -> bool:
    """Whether something answers HTTP on 127.0.0.1:port (the emulator's health check)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
            return True
    except OSError:
        return False
