"""Arrow Flight baseline for nexus-bench: `do_get` of large record batches of one binary column.

    python flight.py serve PORT BYTES      # serves BYTES (rounded up to whole batches) on 127.0.0.1
    python flight.py get PORT              # reads it all; prints {"bytes": N, "seconds": S}

The server builds one 16 MiB batch (16 values of 1 MiB) once and sends it again and again,
so the source costs nothing, as `synthetic:` does for Nexus.
"""

import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.flight as flight

VALUE = 1 << 20
ROWS = 16


class Server(flight.FlightServerBase):
    def __init__(self, port, total):
        # Everything do_get uses is set before the base class starts listening: a client
        # that connects at once must not find the server half-built.
        value = os.urandom(VALUE)
        self.batch = pa.record_batch([pa.array([value] * ROWS, type=pa.binary())], names=["data"])
        self.batches = -(-total // (VALUE * ROWS))
        super().__init__(f"grpc://127.0.0.1:{port}")

    def do_get(self, context, ticket):
        batch, count = self.batch, self.batches
        return flight.GeneratorStream(batch.schema, (batch for _ in range(count)))


def get(port):
    client = flight.connect(f"grpc://127.0.0.1:{port}")
    for _ in range(200):  # the server may still be starting
        try:
            client.wait_for_available(timeout=0.1)
            break
        except Exception:
            time.sleep(0.05)
    start = time.perf_counter()
    received = 0
    for chunk in client.do_get(flight.Ticket(b"all")):
        received += chunk.data.column(0).buffers()[2].size
    seconds = time.perf_counter() - start
    print(json.dumps({"bytes": received, "seconds": seconds}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        Server(int(sys.argv[2]), int(sys.argv[3])).serve()
    else:
        get(int(sys.argv[2]))
