// A stock Node client: @grpc/grpc-js with the gateway's Open Inference Protocol proto, over mutual TLS with a
// bearer token, sends typed contents (what Node and KServe SDKs send) and prints the reply as JSON.
//
// Usage: node model_infer.js REQUEST.json
// REQUEST.json: {"target", "proto", "ca", "cert", "key", "token", "request": ModelInferRequest as JSON}
// Prints {"ok": true, "response": ...} with raw_output_contents in base64, or {"ok": false, "code", "details"}.
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const definition = protoLoader.loadSync(job.proto, { keepCase: true, longs: Number, defaults: false });
const inference = grpc.loadPackageDefinition(definition).inference;

const credentials = grpc.credentials.createSsl(
  fs.readFileSync(job.ca),
  fs.readFileSync(job.key),
  fs.readFileSync(job.cert),
);
const client = new inference.GRPCInferenceService(job.target, credentials);
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${job.token}`);

client.ModelInfer(job.request, metadata, { deadline: Date.now() + 10000 }, (error, response) => {
  if (error) {
    console.log(JSON.stringify({ ok: false, code: grpc.status[error.code], details: error.details }));
  } else {
    response.raw_output_contents = response.raw_output_contents.map((raw) => Buffer.from(raw).toString("base64"));
    console.log(JSON.stringify({ ok: true, response }));
  }
  client.close();
});
