"""A branch backend's document receiver, parsed the way Diia's official Python SDK example
does it (FastAPI/Starlette `request.form()`, then `encodeData`, one file part per document
type for deep links, or `encryptedFile` + `encryptedFileName` for barcodes; files read as
text), without the decryption (that needs the acquirer's key and the UAPKI library).

Binds 127.0.0.1:0, prints `port=<n>` on stdout, then serves. Each received callback is
written as one JSON line to the file named by RECEIVER_LOG: what was parsed (request id,
action, encodeData, file names and their text), and the Standard Webhooks headers.
Answers {"success": true} when encodeData and at least one file were found.
"""

import json
import os
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DOCUMENT_TYPES = [
    "internal-passport",
    "foreign-passport",
    "taxpayer-card",
    "reference-internally-displaced-person",
    "birth-certificate",
    "driver-license",
    "vehicle-license",
]


async def receive(request: Request) -> JSONResponse:
    form = await request.form()
    encode_data = form.get("encodeData")
    files = []
    for doc_type in DOCUMENT_TYPES:
        for part in form.getlist(doc_type):
            files.append({"name": part.filename, "text": (await part.read()).decode()})
    encrypted = form.get("encryptedFile")
    if encrypted is not None:
        name = form.get("encryptedFileName", "_unexpected_")
        files.append({"name": name, "text": (await encrypted.read()).decode()})
    record = {
        "request_id": request.headers.get("x-document-request-trace-id"),
        "action": request.headers.get("x-diia-id-action"),
        "webhook_id": request.headers.get("webhook-id"),
        "encode_data": encode_data,
        "files": files,
    }
    with open(os.environ["RECEIVER_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    return JSONResponse({"success": bool(encode_data) and bool(files)})


app = Starlette(routes=[Route("/diia/documents-receiver", receive, methods=["POST"])])

if __name__ == "__main__":
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"port={sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
    sys.exit(0)
