#!/usr/bin/env python3
"""The saga's three services on one port (standard library only):

  POST /payments      order.created            -> payment.completed (402 if amount > 1000)
  POST /shipping      payment.completed        -> shipment.scheduled
  POST /compensation  dev.weir.delivery.failed -> order.cancelled

Each answers in CloudEvents binary mode. Reply ids are derived from the incoming event's id,
so a redelivered event produces the same reply, which the stream stores once.
"""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEPS = {
    "/payments": ("payment.completed", "pay-"),
    "/shipping": ("shipment.scheduled", "ship-"),
    "/compensation": ("order.cancelled", "cancel-"),
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        step = STEPS.get(self.path)
        if step is None:
            self.send_response(404)
            self.end_headers()
            return
        data = json.loads(body or b"{}")
        print(self.path, self.headers.get("ce-type"), self.headers.get("ce-correlationid"), data)
        if self.path == "/payments" and data.get("amount", 0) > 1000:
            self.send_response(402)
            self.end_headers()
            self.wfile.write(b"card declined")
            return
        reply_type, prefix = step
        out = json.dumps({"orderId": data.get("orderId")}).encode()
        self.send_response(200)
        self.send_header("ce-specversion", "1.0")
        self.send_header("ce-id", prefix + self.headers.get("ce-id", ""))
        self.send_header("ce-source", "/saga" + self.path)
        self.send_header("ce-type", reply_type)
        self.send_header("ce-subject", self.headers.get("ce-subject", ""))
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", 8801), Handler).serve_forever()
