"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), served by each
gateway process on ``grpc_port`` (off when 0): ``service`` translates each method to the gateway's
pipeline, ``convert`` turns messages into tensors and back, ``errors`` maps errors to statuses once,
``server`` holds the limits and the method table. ``inference_pb2`` is generated from
``inference.proto`` by ``scripts/gen_grpc.py``."""
