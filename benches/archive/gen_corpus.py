#!/usr/bin/env python3
"""Generates the archive benchmark corpus: realistic CloudEvents of an online shop (orders,
payments, user activity), as structured JSON, one per line, compressed with zstd.

The output is committed (benches/archive/corpus.jsonl.zst) so every run and every reader of
BENCHMARKS.md measures the same bytes; this script documents how it was made and makes it
again byte for byte (fixed seed, no clock):

    python3 benches/archive/gen_corpus.py > /tmp/corpus.jsonl
    zstd -19 -f /tmp/corpus.jsonl -o benches/archive/corpus.jsonl.zst
"""
import datetime
import json
import random
import sys
import uuid

N = 20_000
rng = random.Random(20261127)

FIRST = ["ana", "ben", "chloe", "dev", "emma", "felix", "grace", "hugo", "iris", "jon",
         "kai", "lea", "mia", "noah", "olga", "paul", "quinn", "rosa", "sam", "tara"]
LAST = ["smith", "garcia", "muller", "rossi", "dubois", "kowalski", "silva", "jensen",
        "novak", "ivanova", "tanaka", "okafor"]
CITIES = [("Berlin", "DE", "10115"), ("Paris", "FR", "75001"), ("Madrid", "ES", "28001"),
          ("Milan", "IT", "20121"), ("Warsaw", "PL", "00-001"), ("Lisbon", "PT", "1100-148"),
          ("Copenhagen", "DK", "1050"), ("Prague", "CZ", "110 00")]
PRODUCTS = [(f"SKU-{1000 + i}", name, price) for i, (name, price) in enumerate([
    ("Espresso beans 1kg", 24.90), ("Ceramic mug", 12.50), ("Pour-over kettle", 54.00),
    ("Burr grinder", 129.00), ("Paper filters x100", 6.40), ("Milk frother", 39.99),
    ("Travel tumbler", 22.00), ("Cold brew jar", 31.50), ("Tea sampler", 18.75),
    ("Scale 0.1g", 45.00), ("Descaler", 9.90), ("Gift card 50", 50.00)])]
PAGES = ["/", "/shop", "/shop/coffee", "/shop/equipment", "/cart", "/checkout",
         "/account", "/account/orders", "/help/shipping", "/blog/brewing-guide"]
AGENTS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
          "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0"]
METHODS = ["card", "card", "card", "paypal", "sepa_debit", "apple_pay"]


def uid():
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def ts(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


customers = []
for i in range(800):
    f, l = rng.choice(FIRST), rng.choice(LAST)
    city = rng.choice(CITIES)
    customers.append({"id": f"cus_{i:05d}", "name": f"{f.title()} {l.title()}",
                      "email": f"{f}.{l}{i}@example.com", "city": city})

t = datetime.datetime(2026, 3, 1, 8, 0, 0)
open_orders = []
order_no = 100_000
out = sys.stdout
for n in range(N):
    t += datetime.timedelta(milliseconds=rng.randint(20, 4000))
    c = rng.choice(customers)
    roll = rng.random()
    ext = {"correlationid": None}
    if roll < 0.45:
        session = f"ses_{rng.getrandbits(48):012x}"
        ev_type = rng.choice(["user.page_viewed"] * 5 + ["user.signed_in", "cart.item_added"])
        subject = f"customer/{c['id']}"
        data = {"customerId": c["id"], "sessionId": session, "page": rng.choice(PAGES),
                "referrer": rng.choice([None, "https://www.google.com/", "newsletter"]),
                "userAgent": rng.choice(AGENTS),
                "ip": f"203.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "durationMs": rng.randint(200, 90_000)}
        if ev_type == "cart.item_added":
            sku, name, price = rng.choice(PRODUCTS)
            data.update({"sku": sku, "name": name, "unitPrice": price, "quantity": rng.randint(1, 3)})
    elif roll < 0.75 or not open_orders:
        order_no += 1
        order_id = f"ord_{order_no}"
        items = []
        for _ in range(rng.randint(1, 4)):
            sku, name, price = rng.choice(PRODUCTS)
            items.append({"sku": sku, "name": name, "quantity": rng.randint(1, 3), "unitPrice": price})
        total = round(sum(i["quantity"] * i["unitPrice"] for i in items), 2)
        city, country, zip_code = c["city"]
        ev_type = "order.created"
        subject = f"order/{order_id}"
        ext["correlationid"] = order_id
        data = {"orderId": order_id, "customerId": c["id"], "email": c["email"],
                "items": items, "currency": "EUR", "total": total,
                "shippingAddress": {"name": c["name"], "street": f"{rng.randint(1, 200)} Main Street",
                                    "city": city, "postalCode": zip_code, "country": country},
                "channel": rng.choice(["web", "web", "ios", "android"])}
        open_orders.append((order_id, total, c))
    else:
        order_id, total, c = open_orders.pop(rng.randrange(len(open_orders)))
        ext["correlationid"] = order_id
        step = rng.random()
        if step < 0.85:
            ev_type = rng.choice(["payment.authorized", "payment.captured"])
            subject = f"payment/pay_{order_id[4:]}"
            data = {"paymentId": f"pay_{order_id[4:]}", "orderId": order_id, "amount": total,
                    "currency": "EUR", "method": rng.choice(METHODS),
                    "card": {"brand": rng.choice(["visa", "mastercard", "amex"]),
                             "last4": f"{rng.randint(0, 9999):04d}"},
                    "processor": "acquirer-eu-1", "authCode": f"{rng.getrandbits(24):06X}",
                    "riskScore": rng.randint(0, 99)}
            if ev_type == "payment.authorized":
                open_orders.append((order_id, total, c))
        else:
            ev_type = "payment.failed"
            subject = f"payment/pay_{order_id[4:]}"
            data = {"paymentId": f"pay_{order_id[4:]}", "orderId": order_id, "amount": total,
                    "currency": "EUR", "method": rng.choice(METHODS),
                    "reason": rng.choice(["insufficient_funds", "card_declined", "expired_card"]),
                    "retryable": rng.random() < 0.5}
    ev = {"specversion": "1.0", "id": uid(), "source": "https://shop.example.com/" + ev_type.split(".")[0],
          "type": "com.example.shop." + ev_type, "subject": subject, "time": ts(t),
          "datacontenttype": "application/json"}
    if ext["correlationid"]:
        ev["correlationid"] = ext["correlationid"]
    ev["data"] = data
    out.write(json.dumps(ev, separators=(",", ":")) + "\n")
