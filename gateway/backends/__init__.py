"""Remote execution: models routed to Open Inference Protocol gRPC servers (MLServer, KServe, Triton, another
gateway), called only after the gateway's own boundary and policy decision (docs/backends.md). ``route`` is what the
pipeline sees (no grpc); ``client`` is the grpc.aio client of one backend; ``fleet`` builds them from settings."""
