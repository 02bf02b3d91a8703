"""The peer's hello-world WSGI app: the same answer as gpe's built-in `hello`."""

HELLO = b"Hello, World!"
NOT_FOUND = b"Not Found\n"


def app(environ, start_response):
    if environ.get("PATH_INFO", "/") == "/":
        status, body = "200 OK", HELLO
    else:
        status, body = "404 Not Found", NOT_FOUND
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
        ],
    )
    return [body]
