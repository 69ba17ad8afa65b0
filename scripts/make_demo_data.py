"""Write the bundled demo data set: pizza orders in free text -> one compact JSON object.

The skill: read an order such as "Can I get two large pepperoni pizzas and a small coke,
deliver to 12 Elm Street" and answer exactly
{"items":[{"name":"pepperoni pizza","size":"large","qty":2},{"name":"coke","size":"small","qty":1}],"address":"12 Elm Street"}
(items in the order mentioned, names singular, keys in this order, no spaces).

Deterministic (seeded, no network); run from the repository root:

    python scripts/make_demo_data.py

It writes src/lorakit/demo/{train,val,test}.jsonl in lorakit's ``chat`` format. Orders are kept
short because the demo trains and generates on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
SPLITS = {"train": 500, "val": 50, "test": 50}
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo"
SYSTEM = "Reply with JSON: items (name, size, qty) and address."

# (singular, plural): the JSON takes the singular, the order text the form its quantity needs.
PIZZAS = "pepperoni,margherita,hawaiian,veggie,bbq chicken,four cheese,mushroom,meat lovers"
ITEMS = [
    *((f"{kind} pizza", f"{kind} pizzas") for kind in PIZZAS.split(",")),
    ("coke", "cokes"),
    ("diet coke", "diet cokes"),
    ("sprite", "sprites"),
    ("lemonade", "lemonades"),
    ("iced tea", "iced teas"),
    ("water", "waters"),
    ("garlic bread", "garlic breads"),
    ("salad", "salads"),
    ("brownie", "brownies"),
]
SIZES = ["small", "medium", "large"]
QTY_WORDS = {1: ["a", "one", "1"], 2: ["two", "2"], 3: ["three", "3"], 4: ["four", "4"]}
STREETS = (  # split on spaces where used
    "Elm Oak Maple Pine Cedar Main High Park Lake Hill Church Mill River Station King Queen "
    "Bridge Market Willow Birch Sunset Harbor Forest Garden Spring Chestnut Victoria Walnut"
)
STREET_TYPES = ["Street", "Avenue", "Road", "Lane", "Drive", "Way", "Court", "Place"]

ITEM_FORMS = ["{qty} {size} {name}", "{qty} {size} {name}", "{qty} {size}-size {name}"]
JOINS = [(", ", " and "), (", ", " & "), (", ", ", plus "), (" + ", " + "), (", ", ", ")]
ORDERS = [
    "I'd like {items}, deliver to {address}",
    "Can I get {items} to {address}?",
    "Could I please have {items}. Address: {address}",
    "Please send {items} to {address}",
    "{items} to {address} please",
    "Hi, I want to order {items}. My address is {address}",
    "Deliver to {address}: {items}",
    "Order for {address}: {items}",
    "We'll have {items}, delivered to {address}",
    "hey can we get {items} at {address}",
    "{address} - {items}",
    "Send {items} over to {address}, thanks!",
]


def make_order(rng: random.Random) -> tuple[str, str]:
    """One order: (free text, expected compact JSON)."""
    picked = rng.sample(ITEMS, k=rng.choice([1, 1, 2, 2, 2, 3]))
    items, phrases = [], []
    for singular, plural in picked:
        qty, size = rng.choice([1, 1, 1, 2, 2, 3, 4]), rng.choice(SIZES)
        name = singular if qty == 1 else plural
        form = rng.choice(ITEM_FORMS)
        phrases.append(form.format(qty=rng.choice(QTY_WORDS[qty]), size=size, name=name))
        items.append({"name": singular, "size": size, "qty": qty})
    sep, last = rng.choice(JOINS)
    text = phrases[0] if len(phrases) == 1 else sep.join(phrases[:-1]) + last + phrases[-1]
    address = f"{rng.randint(1, 999)} {rng.choice(STREETS.split())} {rng.choice(STREET_TYPES)}"
    order = rng.choice(ORDERS).format(items=text, address=address)
    answer = json.dumps({"items": items, "address": address}, separators=(",", ":"))
    return order[0].upper() + order[1:], answer


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        lines = []
        while len(lines) < count:
            order, answer = make_order(rng)
            if order in seen:  # no order text appears twice, so test orders are unseen
                continue
            seen.add(order)
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": order},
                {"role": "assistant", "content": answer},
            ]
            lines.append(json.dumps({"messages": messages}))
        (OUT_DIR / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
