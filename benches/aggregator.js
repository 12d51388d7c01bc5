// A central aggregator for the push benchmark (benches/push.sh): accepts every transaction
// Bundle at once with a transaction-response whose entries are all "200 OK", and counts.
// GET /stats → { requests, entries, first_ms, last_ms } (first request received, last
// answer sent, milliseconds since the epoch). Node's own http module: nothing to install.
// Usage: node benches/aggregator.js PORT
"use strict";
const http = require("http");
const port = Number(process.argv[2] || 6632);
const stats = { requests: 0, entries: 0, first_ms: null, last_ms: null };

http
  .createServer((request, response) => {
    if (request.method === "GET" && request.url === "/stats") {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify(stats));
      return;
    }
    if (stats.first_ms === null) stats.first_ms = Date.now();
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      let bundle;
      try {
        bundle = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch (error) {
        response.writeHead(400, { "content-type": "application/fhir+json" });
        response.end(JSON.stringify({ resourceType: "OperationOutcome", issue: [{ severity: "error", code: "invalid" }] }));
        return;
      }
      const entries = (bundle.entry || []).map(() => ({ response: { status: "200 OK" } }));
      stats.requests += 1;
      stats.entries += entries.length;
      response.writeHead(200, { "content-type": "application/fhir+json; fhirVersion=4.0" });
      response.end(JSON.stringify({ resourceType: "Bundle", type: "transaction-response", entry: entries }));
      stats.last_ms = Date.now();
    });
  })
  .listen(port, "127.0.0.1");
