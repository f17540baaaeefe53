#!/usr/bin/env python3
"""A Python grpcio client for serin's Management API, generated at run time from
control-api/proto with grpcio-tools (no checked-in generated code).

Usage: client.py HOST:PORT

Sets payment's weights to v1=90 v2=10, reads the status, then sends weights that add
up to 110 and reports the error the server returns. Prints one JSON object and
exits 0 when every call behaved as a client would see it (the caller checks the
values); exits 1 on anything unexpected.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTOS = [
    "serin/control/v1/discovery.proto",
    "serin/control/v1/management.proto",
    "serin/control/v1/load.proto",
]


def generate(out_dir):
    """Runs grpc_tools.protoc on our .proto files into out_dir."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        PROTO_DIR,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
    ] + PROTOS
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        sys.exit("protoc failed (%d): %s%s" % (result.returncode, result.stdout, result.stderr))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: client.py HOST:PORT")
    address = sys.argv[1]
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as e:
        sys.exit("missing Python module (%s): pip install grpcio grpcio-tools" % e)

    with tempfile.TemporaryDirectory(prefix="serin-pb-") as out_dir:
        generate(out_dir)
        sys.path.insert(0, out_dir)
        import grpc
        from serin.control.v1 import management_pb2, management_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            management = management_pb2_grpc.ManagementStub(channel)

            changed = management.SetWeights(
                management_pb2.SetWeightsRequest(service="payment", weights={"v1": 90, "v2": 10}),
                timeout=20,
            )
            status = management.GetStatus(management_pb2.GetStatusRequest(), timeout=20)

            invalid = None
            try:
                management.SetWeights(
                    management_pb2.SetWeightsRequest(service="payment", weights={"v1": 60, "v2": 50}),
                    timeout=20,
                )
            except grpc.RpcError as e:
                invalid = {"code": e.code().name, "details": e.details()}

    report = {
        "set_weights": {
            "version": changed.version,
            "changed": changed.changed,
            "type_url": changed.type_url,
            "weights": dict(changed.weights),
        },
        "status": {
            "versions": dict(status.versions),
            "proxies": len(status.proxies),
        },
        "invalid_set_weights": invalid,
    }
    print(json.dumps(report, sort_keys=True))
    if invalid is None:
        print("SetWeights with weights adding up to 110 was accepted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
