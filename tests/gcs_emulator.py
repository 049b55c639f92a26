"""gcp-storage-emulator on 127.0.0.1, answering downloads as Cloud Storage does.

  python tests/gcs_emulator.py PORT BUCKET

tensorstore (orbax's arrays) takes an object's generation from the x-goog-generation header
of a download and makes its next read of the object conditional on it
(ifGenerationNotMatch). The emulator sends no such header and ignores the condition, so
tensorstore's later reads fail with "Malformed StorageGeneration" (whether a save reads
a manifest twice depends on timing). Here downloads carry the header and honour
ifGenerationNotMatch and ifGenerationMatch (304 and 412), as Cloud Storage does.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        generation = storage.get_file_obj(request.params["bucket_name"],
                                          request.params["object_id"])["generation"]
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    condition = {name: request.query[name][0] for name in (
        "ifGenerationNotMatch", "ifGenerationMatch") if name in request.query}
    if condition.get("ifGenerationNotMatch") == generation:
        response.status = HTTPStatus.NOT_MODIFIED
    elif condition.get("ifGenerationMatch", generation) != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
    else:
        response["x-goog-generation"] = generation
        _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routes from it

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
