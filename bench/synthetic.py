"""Seeded synthetic CRM leads: realistic columns, people repeated under variations."""

from __future__ import annotations

import csv
import random
from pathlib import Path

__all__ = ["write_leads_csv"]

FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Carlos",
    "María",
    "Wei",
    "Aiko",
    "Fatima",
    "Olu",
    "Priya",
    "Lukas",
    "Chloé",
]
LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Lopez",
    "Martinez",
    "Wilson",
    "Anderson",
    "Taylor",
    "Thomas",
    "Moore",
    "Martin",
    "Lee",
    "Chen",
    "Müller",
    "Tanaka",
    "Okafor",
    "Patel",
    "Rossi",
    "Dubois",
    "Nowak",
    "Kim",
    "Singh",
]
COMPANIES = [
    "Acme Corp",
    "Globex Inc.",
    "Initech LLC",
    "Umbrella Ltd",
    "Stark Industries",
    "Wayne Enterprises",
    "Hooli",
    "Vandelay Industries",
    "Soylent Co",
    "Tyrell Corp",
]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "example.com", "mail.example.org"]
HEADER = [
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "job_title",
    "city",
    "country",
    "updated_at",
]


def write_leads_csv(path: Path, rows: int, seed: int = 7, duplicate_share: float = 0.1) -> Path:
    """`rows` leads; about `duplicate_share` of them repeat an earlier person's email or phone."""
    rng = random.Random(seed)
    people: list[tuple[str, str, str, str]] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i in range(rows):
            if people and rng.random() < duplicate_share:
                first, last, email, phone = rng.choice(people)
                if rng.random() < 0.5:
                    email = email.upper() if rng.random() < 0.5 else email
                    phone = ""
                else:
                    email = ""
                    phone = f"({phone[2:5]}) {phone[5:8]}-{phone[8:]}"
            else:
                first, last = rng.choice(FIRST), rng.choice(LAST)
                email = f"{first.lower()}.{last.lower()}{i}@{rng.choice(DOMAINS)}"
                # Unique per person: exchange 200-999 and line number from the row index.
                number = f"{200 + (i // 10_000) % 800}{i % 10_000:04d}"
                phone = f"+1{rng.choice(['415', '212', '646', '617'])}{number}"
                if rng.random() < 0.4:
                    phone = ""
                people.append((first, last, email, phone or f"+1718{number}"))
            writer.writerow(
                [
                    f"B-{i}",
                    first,
                    last,
                    email,
                    phone,
                    rng.choice(COMPANIES),
                    "Buyer",
                    "Springfield",
                    "US",
                    f"2026-01-{1 + i % 28:02d}T10:00:00Z",
                ]
            )
    return path
