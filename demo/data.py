"""The demo DuckDB database: fake customers and API keys (realistic shapes, not real people)."""
from __future__ import annotations

from pathlib import Path

import duckdb

FIRST = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
         "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy"]
LAST = ["Nguyen", "Smith", "Garcia", "Okafor", "Kowalski", "Rossi", "Tanaka", "Müller", "Dubois", "Silva"]
# Test card numbers that pass the Luhn check (issuer test ranges).
CARDS = ["4111111111111111", "5555555555554444", "4012888888881881", "378282246310005",
         "6011111111111117", "5105105105105100", "4222222222222", "3530111333300000"]


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def customers() -> list[dict]:
    out = []
    for i in range(1, 21):
        first, last = FIRST[i - 1], LAST[i % len(LAST)]
        out.append({
            "id": i,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower().replace('ü', 'u')}@example.com",
            "ssn": f"{100 + i * 7:03d}-{10 + i:02d}-{1000 + i * 37:04d}",
            "card_number": CARDS[i % len(CARDS)],
            "notes": f"prefers phone +1-202-555-{100 + i:04d}; vip={i % 3 == 0}",
        })
    return out


def api_keys() -> list[dict]:
    return [
        {"id": 1, "owner": "billing", "secret": "sk_live_51Hdemo0000000000000000000000000000000000"},
        {"id": 2, "owner": "aws-sync", "secret": "AKIAIOSFODNN7EXAMPLE"},
        {"id": 3, "owner": "ci", "secret": "ghp_demo000000000000000000000000000000000"},
    ]


def ensure_db(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "demo.duckdb"
    con = duckdb.connect(str(db))
    try:
        con.execute("CREATE TABLE IF NOT EXISTS customers(id INTEGER PRIMARY KEY, name VARCHAR, email VARCHAR,"
                    " ssn VARCHAR, card_number VARCHAR, notes VARCHAR)")
        con.execute("CREATE TABLE IF NOT EXISTS api_keys(id INTEGER PRIMARY KEY, owner VARCHAR, secret VARCHAR)")
        if con.execute("SELECT count(*) FROM customers").fetchone()[0] == 0:
            con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)",
                            [tuple(c.values()) for c in customers()])
        if con.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0:
            con.executemany("INSERT INTO api_keys VALUES (?, ?, ?)", [tuple(k.values()) for k in api_keys()])
    finally:
        con.close()
    return db
