#!/usr/bin/env python3
"""Generate loraline's committed sample raw inputs (data/raw/) and their manifest, deterministically.

    python tools/make_sample_data.py           # (re)write data/raw/** and tools/sample_data_manifest.json
    python tools/make_sample_data.py --check   # exit 1 if the committed files differ from what would be written

Everything here is synthetic business data written for this project (nothing downloaded). Each tenant
gets its own seeded ``random.Random`` so editing one tenant never changes the other's bytes. All text
files use '\\n' newlines; JSON is written with a fixed key order.

Tenants and tasks (see data/raw/README.md for the full description):

* acme-shop  -- customer emails of an online home-goods shop -> one compact JSON object:
  {"intent": <refund|return|exchange|track|cancel|change_address>, "order": "<5 digits>",
   "category": <kitchen|bedding|bath|lighting|furniture|decor>, "urgent": <true|false>}
  intent is cued by the request wording, category by the product named, urgent by an explicit
  urgency phrase; "order" is the only field copied from the text (the only 5-digit number in it).
  The emails come as a first quarter in three shapes with the seeded defects below, and a clean
  second-quarter JSONL export of 800 (docs/benchmarks.md: half the emails, passed over twice as
  often, taught the category less).
* globex-it  -- IT helpdesk tickets -> {"team": <network|identity|hardware|email|database>,
  "priority": <P1|P2|P3|P4>}; team is cued by the ticket vocabulary, priority by the impact sentence
  (whole office/site down -> P1, one user fully blocked -> P2, annoyance / workaround -> P3,
  question or request -> P4). Some JSONL rows are multi-turn: the user follows up and the assistant
  routes again.

Intentional defects (one clear problem each; row numbers are 1-based as the readers count them:
JSONL line, JSON array element, CSV data record without the header, Parquet row). Exact row numbers
are computed at generation time and written to tools/sample_data_manifest.json and data/raw/README.md.

acme-shop
  orders_email_2024q1.jsonl    a line cut off mid-object                      -> malformed_json
  orders_email_2024q1.jsonl    a row without "output"                         -> missing_field
  orders_email_2024q1.jsonl    "output" is a number (48213), not a string     -> wrong_type
  orders_email_2024q1.jsonl    a line holding a latin-1 byte (0xE9)           -> invalid_utf8
  orders_email_2024q1.jsonl    an exact copy of an earlier line               -> duplicate
  support_inbox_export.csv     empty prompt                                   -> empty_field
  support_inbox_export.csv     whitespace-only completion                     -> empty_field
  support_inbox_export.csv     copy of an earlier row differing only in whitespace -> duplicate
  chat_transcripts.json        assistant turn with role "bot"                 -> unknown_role
  chat_transcripts.json        conversation ends with the user turn           -> no_assistant_turn
  chat_transcripts.json        pasted email thread, > 20000 characters        -> too_long
globex-it
  tickets_2024_export.parquet  gpt answer is whitespace only                  -> empty_field
  tickets_2024_export.parquet  turn with from "bot"                           -> unknown_role
  tickets_2024_export.parquet  ends with an unanswered human follow-up        -> no_assistant_turn
  tickets_2024_export.parquet  an exact copy of an earlier row                -> duplicate
  helpdesk_chats.jsonl         a line cut off mid-object                      -> malformed_json
  helpdesk_chats.jsonl         "messages" is a JSON-encoded string, not a list -> wrong_type
  helpdesk_chats.jsonl         a line holding a latin-1 byte (0xFC)           -> invalid_utf8
  helpdesk_chats.jsonl         pasted VPN client log, > 20000 characters      -> too_long
  helpdesk_chats.jsonl         copy of an earlier row differing only in whitespace -> duplicate
  tickets_2023_q4_export_corrupt.parquet  truncated file (no footer)          -> unreadable_file (row null)

Duplicates are always the *later* row, within the same file as the original. "Differing only in
whitespace" means equal after stripping and collapsing runs of whitespace in every message.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
MANIFEST = ROOT / "tools" / "sample_data_manifest.json"
ACME_Q2_ROWS = 800  # the committed second-quarter export; --acme-q2-rows writes other sizes
MAX_CHARS = 20000  # params.yaml prepare.max_chars


def dumps(obj) -> str:
    """Compact-with-spaces JSON in insertion order, as the answers are written."""
    return json.dumps(obj, ensure_ascii=False)


def balanced(rng: random.Random, labels: list, n: int) -> list:
    out = (labels * (n // len(labels) + 1))[:n]
    rng.shuffle(out)
    return out


def norm_ws(text: str) -> str:
    return " ".join(text.split())


# Words a typo must never touch: they carry the labels.
PROTECTED = re.compile(
    r"refund|money|return|send|back|exchange|swap|replace|trade|track|where|status|ship|deliver|cancel|"
    r"void|address|redirect|urgent|asap|today|right|immediately|soon|rush|hurry|time|tomorrow|"
    r"chance|arrive|update|dispatch|label|\d",
    re.I,
)


def add_typo(rng: random.Random, text: str, products: list[str]) -> str:
    words = [
        m
        for m in re.finditer(r"[A-Za-z]{5,}", text)
        if not PROTECTED.search(m.group()) and not any(m.group().lower() in p.lower() for p in products)
    ]
    if not words:
        return text
    m = rng.choice(words)
    w = m.group()
    i = rng.randrange(1, len(w) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        w2 = w[:i] + w[i + 1] + w[i] + w[i + 2 :]  # swap
    elif kind == 1:
        w2 = w[:i] + w[i + 1 :]  # drop
    else:
        w2 = w[:i] + w[i] + w[i:]  # double
    return text[: m.start()] + w2 + text[m.end() :]


# ====================================================================================== acme-shop

ACME_PRODUCTS = {
    "kitchen": [
        "cast-iron skillet",
        "ceramic dinner plate set",
        "bamboo cutting board",
        "stainless steel kettle",
        "enamel Dutch oven",
        "glass storage jar set",
        "espresso cup set",
        "knife block set",
        "stoneware mixing bowl",
        "copper measuring jug",
    ],
    "bedding": [
        "linen duvet cover",
        "percale sheet set",
        "down pillow",
        "quilted bedspread",
        "flannel pillowcase pair",
        "memory foam mattress topper",
        "cotton quilt",
        "weighted blanket",
        "silk pillowcase",
        "fitted sheet",
    ],
    "bath": [
        "Turkish bath towel set",
        "waffle bathrobe",
        "cotton bath mat",
        "linen shower curtain",
        "hand towel set",
        "bamboo bath caddy",
        "teak shower stool",
        "ceramic soap dispenser",
        "heated towel rail",
        "bath sheet bundle",
    ],
    "lighting": [
        "brass floor lamp",
        "rattan pendant shade",
        "ceramic table lamp",
        "LED desk lamp",
        "plug-in wall sconce",
        "outdoor string light chain",
        "smoked glass pendant light",
        "arc reading lamp",
        "pleated lampshade",
        "dimmable bulb 4-pack",
    ],
    "furniture": [
        "oak coffee table",
        "velvet armchair",
        "ladder bookshelf",
        "counter-height bar stool",
        "walnut side table",
        "low TV console",
        "dining chair pair",
        "storage ottoman",
        "writing desk",
        "slim shoe cabinet",
    ],
    "decor": [
        "woven wall hanging",
        "ribbed ceramic vase",
        "framed botanical print",
        "round wall mirror",
        "scented candle trio",
        "jute rug",
        "throw cushion cover",
        "faux olive tree",
        "gallery picture frame set",
        "hand-tufted wool rug",
    ],
}
ACME_CATEGORIES = list(ACME_PRODUCTS)
ACME_DAMAGE = {
    "kitchen": ["arrived chipped", "came with a crack down the side", "arrived with a dent in it"],
    "bedding": ["has a tear along the seam", "arrived with a stain on it", "came with a hole in the stitching"],
    "bath": ["arrived with a stain on it", "has a pulled seam", "came with a crack in it"],
    "lighting": ["arrived with the shade dented", "flickers and then cuts out", "came with a cracked base"],
    "furniture": ["arrived with a split in the top", "came with a broken leg", "is missing two of the fixings"],
    "decor": ["arrived cracked", "came with a chipped corner", "arrived torn in one corner"],
}
ACME_VARIANTS = {
    "kitchen": ["the larger size", "the matte black finish", "the 28 cm size", "the sage green one", "the white one"],
    "bedding": ["the queen size", "the king size", "the double size", "the sage green one", "the white one"],
    "bath": ["the charcoal colour", "the white one", "the larger size", "the navy colour", "the sand colour"],
    "lighting": ["the brass finish", "the matte black finish", "the smaller size", "the white one", "the larger size"],
    "furniture": [
        "the natural oak finish",
        "the walnut finish",
        "the larger size",
        "the charcoal colour",
        "the white one",
    ],
    "decor": ["the larger size", "the terracotta colour", "the 120 cm size", "the smaller size", "the white one"],
}
ACME_INTENTS = ["refund", "return", "exchange", "track", "cancel", "change_address"]

# {p} product, {o} order reference ("order #48213" etc.), {d} days, {v} a variant, {a} an address,
# {x} a damage description fitting the product's category.
ACME_TEMPLATES = {
    "refund": [
        "The {p} from {o} {x}. I don't want a replacement, just my money back please.",
        "I was charged twice for {o} (the {p}). Could you refund the duplicate charge?",
        "I posted the {p} back to you two weeks ago ({o}) and still haven't seen the refund on my card.",
        "{O} never showed up. The tracking page says delivered but there is no {p} here. Please refund me.",
        "Please issue a refund for the {p} in {o}. It broke after only {d} days.",
        "I'd like my money back for {o}. The {p} is nothing like the photos on your site.",
        "Can you refund the delivery fee on {o}? The {p} took three weeks to turn up.",
        "My {p} ({o}) {x}. A refund to my original payment method would be great.",
        "Requesting a full refund on {o}. The {p} {x} and I've given up on it.",
        "The {p} went on sale two days after I bought it. Could you refund the price difference on {o}?",
        "You already collected the {p} for {o} but I haven't had my money back yet.",
        "I'm asking for a refund on {o}. The {p} smells strongly of chemicals and we can't use it.",
    ],
    "return": [
        "I'd like to return the {p} from {o}. It doesn't suit the room after all.",
        "How do I send back the {p}? It's {o}, unused and still in the box.",
        "Could you email me a return label for {o}? The {p} is too big for our space.",
        "I want to return {o}. We changed our minds about the {p}.",
        "Please start a return for the {p} ({o}). We got it as a gift and already have one.",
        "Is it still possible to return the {p} I bought in {o}? It's been about {d} days.",
        "We're sending the {p} back. Can you set up a return for {o}?",
        "I need a return authorisation for {o}. The {p} isn't what I expected.",
        "Can I drop the {p} at a pickup point to return it? It's {o}.",
        "The {p} ({o}) clashes with everything in our home, so I'd like to send it back.",
        "Hoping to return the {p} from {o}. The colour looked different online.",
        "What's the process to return an item? I have the {p} from {o} and it's not for us.",
    ],
    "exchange": [
        "The {p} in {o} isn't right for us. Can I swap it for {v}?",
        "Could I exchange the {p} from {o} for {v}?",
        "I'd like to swap the {p} ({o}) for {v} if you have it in stock.",
        "Ordered the {p} ({o}) but really need {v}. Is an exchange possible?",
        "Can you send a replacement {p} for {o}? Mine {x} and I'd like the same item again.",
        "Exchange request for {o}: the {p} arrived in the wrong finish, I'd like {v}.",
        "Is it possible to trade the {p} I got in {o} for {v}?",
        "I love the style but want to exchange the {p} ({o}) for {v}.",
        "The {p} from {o} {x}. Please send me a replacement of the same item.",
        "Could we swap {o} over? The {p} is lovely but we need {v}.",
        "I'd like to exchange my {p}, {o}, for {v}. Happy to send the first one back.",
    ],
    "track": [
        "Where is my order? It's {o}, the {p}.",
        "Can you tell me when {o} will arrive? I ordered the {p} {d} days ago.",
        "The tracking link for {o} hasn't updated since Monday. Any news on my {p}?",
        "Has my {p} shipped yet? That's {o}.",
        "I haven't received a shipping confirmation for {o} (the {p}). What's the status?",
        "Could you check the delivery status of {o}? Still waiting on the {p}.",
        "Any update on {o}? The {p} was supposed to be here by now.",
        "What's the tracking number for {o}? I'd like to follow the {p} on its way.",
        "When will the {p} from {o} be dispatched?",
        "My {p} ({o}) has said 'in transit' for a week. Where is it now?",
        "Just checking where {o} is. The {p} hasn't turned up and I've had no email.",
    ],
    "cancel": [
        "Please cancel {o}. I ordered the {p} by mistake.",
        "I need to cancel my order for the {p} ({o}) before it ships.",
        "Can you cancel {o}? I no longer need the {p}.",
        "Cancel {o} please, I found the {p} cheaper locally.",
        "I placed the same order twice by accident. Please cancel {o} (the {p}).",
        "Is it too late to cancel {o}? We've decided against the {p}.",
        "Please void {o}, the {p} order. My partner already bought one.",
        "I want to cancel the {p} on {o} and not be charged for it.",
        "Kindly cancel {o}. We bought the {p} elsewhere already.",
        "Don't send {o}! I need to cancel the {p}.",
        "Could you cancel {o} for me? Ordering the {p} was a mistake.",
    ],
    "change_address": [
        "I moved last week. Can you update the shipping address on {o} (the {p})? New address: {a}.",
        "Please change the delivery address for {o} ({p}) to {a}.",
        "Could the {p} in {o} go to my office instead? The address is {a}.",
        "Wrong address on {o}! The {p} should go to {a}, not my old place.",
        "Can I redirect {o} to {a}? I won't be home the week the {p} is due.",
        "I need to update where {o} is being delivered. Please send the {p} to {a}.",
        "Typo in my shipping address for {o}, the {p} order. The correct one is {a}.",
        "Please ship {o} to my parents' house instead: {a}. It's the {p}.",
        "New delivery address for the {p} on {o}: {a}. Sorry for the hassle.",
        "Change of address for {o} please. Deliver the {p} to {a}.",
    ],
}
ACME_SUBJECTS = {
    "refund": ["Refund request", "Money back please", "Refund for {ord}", "Refund please", "Refund"],
    "return": ["Return request", "Returning an item", "Return label for {ord}", "How to return", "Return"],
    "exchange": ["Exchange request", "Swap item", "Exchange for {ord}", "Exchange", "Can I swap?"],
    "track": [
        "Where is my order?",
        "Tracking for {ord}",
        "Delivery status",
        "Order not arrived yet",
        "Shipping update?",
    ],
    "cancel": ["Cancel order", "Cancellation {ord}", "Please cancel", "Cancel {ord}", "Cancel my order"],
    "change_address": [
        "Change of address",
        "Delivery address update",
        "Wrong address on {ord}",
        "New address",
        "Redirect delivery",
    ],
}
ACME_ORDER_REFS = [
    "order #{n}",
    "order {n}",
    "order no. {n}",
    "order number {n}",
    "order ref {n}",
    "#{n}",
    "order #{n}",
    "order {n}",
]
ACME_URGENT = [
    "This is urgent.",
    "Please treat this as urgent.",
    "I need this sorted today, please.",
    "Please handle this ASAP.",
    "Could you deal with this as soon as possible?",
    "I need an answer right away.",
    "Time-sensitive, please reply immediately.",
    "It's a gift for Saturday, so this is really urgent.",
    "We move out tomorrow, so I need this fixed today.",
    "URGENT - please get back to me asap.",
    "Please help as soon as possible, I'm running out of time.",
]
ACME_CALM = [
    "No rush on this.",
    "Whenever you get a chance.",
    "No hurry at all.",
    "No rush, just let me know.",
    "Take your time.",
]
ACME_GREETINGS = [
    "Hi,",
    "Hello,",
    "Hi there,",
    "Dear Acme Home team,",
    "Good morning,",
    "Hey,",
    "Hello Acme,",
    "Dear customer service,",
    "Hi team,",
    "Good afternoon,",
]
ACME_CLOSINGS = [
    "Thanks,",
    "Thank you,",
    "Many thanks,",
    "Best,",
    "Kind regards,",
    "Cheers,",
    "Regards,",
    "Thanks in advance,",
    "Best wishes,",
]
FIRST_NAMES = [
    "Maria",
    "James",
    "Priya",
    "Tom",
    "Aisha",
    "Daniel",
    "Chloe",
    "Mateo",
    "Hannah",
    "Liam",
    "Sofia",
    "Noah",
    "Grace",
    "Oliver",
    "Yuki",
    "Ethan",
    "Zoë",
    "Samuel",
    "Amelia",
    "Lucas",
    "Fatima",
    "Jack",
    "Ingrid",
    "Kwame",
    "Elena",
    "Ben",
    "Nadia",
    "Oscar",
    "Mei",
    "Rafael",
    "Julia",
    "Connor",
    "Leila",
    "Marcus",
    "Ruth",
    "Tariq",
    "Emma",
    "José",
    "Freya",
    "Dmitri",
]
LAST_NAMES = [
    "Lopez",
    "Carter",
    "Shah",
    "Nguyen",
    "Okafor",
    "Brennan",
    "Müller",
    "Rossi",
    "Kim",
    "Walsh",
    "Haddad",
    "Jensen",
    "Patel",
    "Morgan",
    "Silva",
    "Novak",
    "Reid",
    "Tanaka",
    "Hughes",
    "Adeyemi",
]
STREETS = [
    "Maple",
    "Elm",
    "Harbour",
    "Station",
    "Church",
    "Willow",
    "Cedar",
    "Mill",
    "Park",
    "Orchard",
    "Bridge",
    "Lakeview",
    "Chestnut",
    "High",
]
STREET_KINDS = ["Street", "Road", "Avenue", "Lane", "Drive", "Close", "Way"]
CITIES = [
    "Portland, OR",
    "Austin, TX",
    "Madison, WI",
    "Raleigh, NC",
    "Boise, ID",
    "Tucson, AZ",
    "Albany, NY",
    "Dayton, OH",
    "Eugene, OR",
    "Savannah, GA",
    "Burlington, VT",
    "Fresno, CA",
]
ACME_INSTRUCTIONS = [
    "Extract the order request as JSON.",
    "Extract the order request as JSON.",
    "Convert this customer email into a JSON record for the order system.",
    "Read the email and return the order request as JSON.",
    "Turn this customer email into order-system JSON.",
]
ACME_SYSTEMS = [
    "You are Acme Home's order-desk assistant. Read the customer's email and reply with one JSON object "
    "with the keys intent, order, category and urgent.",
    "You turn Acme Home customer emails into JSON for the order system: intent, order, category, urgent.",
    "Extract the order request from the customer email as JSON.",
]


def acme_address(rng: random.Random) -> str:
    apt = f", Apt {rng.randint(1, 40)}{rng.choice('ABCD')}" if rng.random() < 0.3 else ""
    return f"{rng.randint(2, 998)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}{apt}, {rng.choice(CITIES)}"


def acme_email(rng: random.Random, intent: str, category: str, urgent: bool, order: str) -> tuple[str, dict]:
    product = rng.choice(ACME_PRODUCTS[category])
    template = rng.choice(ACME_TEMPLATES[intent])
    ref = rng.choice(ACME_ORDER_REFS).format(n=order)
    body = template.format(
        p=product,
        o=ref,
        O=ref[0].upper() + ref[1:],
        d=rng.randint(3, 40),
        v=rng.choice(ACME_VARIANTS[category]),
        a=acme_address(rng),
        x=rng.choice(ACME_DAMAGE[category]),
    )
    extra = []
    if urgent:
        extra.append(rng.choice(ACME_URGENT))
    elif rng.random() < 0.25:
        extra.append(rng.choice(ACME_CALM))
    if rng.random() < 0.2:
        extra.append(
            rng.choice(
                [
                    "I've been a customer for years and this is the first problem I've had.",
                    "I checked the FAQ but couldn't find an answer.",
                    "My phone number is on the account if that helps.",
                    "Photos can be sent if you need them.",
                    "I ordered through the website, not the app.",
                    "Please reply to me by email rather than phone.",
                ]
            )
        )
    if extra and urgent and rng.random() < 0.35:
        body = extra[0] + " " + body + ("" if len(extra) == 1 else " " + " ".join(extra[1:]))
    elif extra:
        body = body + " " + " ".join(extra)
    name = rng.choice(FIRST_NAMES) + (" " + rng.choice(LAST_NAMES) if rng.random() < 0.4 else "")
    parts = []
    if rng.random() < 0.55:
        subject = rng.choice(ACME_SUBJECTS[intent]).format(ord=order if rng.random() < 0.5 else "my order")
        if urgent and rng.random() < 0.4:
            subject = "URGENT: " + subject
        parts.append(f"Subject: {subject}\n")
    if rng.random() < 0.85:
        parts.append(rng.choice(ACME_GREETINGS) + "\n")
    parts.append(body + "\n")
    parts.append(rng.choice(ACME_CLOSINGS) + "\n" + name if rng.random() < 0.85 else name)
    text = "\n".join(parts)
    if rng.random() < 0.12:
        text = add_typo(rng, text, ACME_PRODUCTS[category])
    if rng.random() < 0.04:
        text = text.lower()
    numbers = set(re.findall(r"\d{5,}", text))
    assert numbers == {order}, (text, order)
    label = {"intent": intent, "order": order, "category": category, "urgent": urgent}
    return text, label


def acme_rows(rng: random.Random, n: int, orders: list[str], seen: set[str]) -> list[tuple[str, str]]:
    """n emails with balanced intents and categories, ~35% urgent; every email text is new to `seen`."""
    intents = balanced(rng, ACME_INTENTS, n)
    cats = balanced(rng, ACME_CATEGORIES, n)
    urg = [i < round(n * 0.35) for i in range(n)]
    rng.shuffle(urg)
    rows = []
    for i in range(n):
        for _ in range(50):
            text, label = acme_email(rng, intents[i], cats[i], urg[i], orders[i])
            if norm_ws(text) not in seen:
                break
        seen.add(norm_ws(text))
        rows.append((text, dumps(label)))
    return rows


def long_email_thread(rng: random.Random, order: str) -> tuple[str, str]:
    """A customer who pasted the whole back-and-forth thread (quoted) under a short new message."""
    text, label = acme_email(rng, "refund", "furniture", False, order)
    lines = [text, ""]
    k = 0
    while sum(len(x) + 1 for x in lines) < MAX_CHARS + 3000:
        k += 1
        lines.append(f"> On {k} March, Acme Home Support wrote:")
        lines.append(
            "> Thank you for contacting Acme Home. We're sorry to hear about the problem with your order. "
            "Our team is reviewing the photos you sent and we will update you within two business days. "
            "If you have any further details, simply reply to this email and they will be added to your case."
        )
        lines.append(">")
        lines.append(f"> > On {k} March, the customer wrote:")
        lines.append(
            "> > I'm still waiting to hear back about the coffee table. The top is split along the grain and "
            "one of the legs doesn't line up with the bracket. I've attached more photos from a different "
            "angle and the packaging it came in, which was also damaged on one corner."
        )
        lines.append("")
    return "\n".join(lines), dumps(label)


# ====================================================================================== globex-it

GLOBEX_TEAMS = ["network", "identity", "hardware", "email", "database"]
GLOBEX_PRIORITIES = ["P1", "P2", "P3", "P4"]
SITES = ["London", "Leeds", "Berlin", "Austin", "Toronto", "Singapore", "Dublin", "Madrid"]
DEPTS = ["Finance", "Sales", "Warehouse", "HR", "Legal", "Marketing", "Customer Support", "Procurement", "R&D"]
DBS = ["ORDERS_PROD", "crm-reporting", "erp01", "analytics warehouse", "billing", "inventory"]
GROUPS = ["Finance-Reports", "Sales-Leads", "HR-Confidential", "Legal-Contracts", "Marketing-Assets"]
MAILBOXES = ["invoices", "support", "careers", "press", "orders"]

# (subject, body, scope): "user" issues fit P2/P3 only, "site" issues fit P1/P2/P3, "wide" issues are
# inherently multi-user and are used for P1 only.
GLOBEX_PROBLEMS = {
    "network": [
        ("VPN keeps dropping", "My VPN connection drops every few minutes and I have to reconnect.", "site"),
        ("Wi-Fi not connecting", "The office Wi-Fi (GLOBEX-CORP) won't connect, it just says no internet.", "site"),
        ("Network drive times out", "I can't reach the network drive \\\\fs01\\shared, it times out.", "site"),
        (
            "Dead ethernet port",
            "The ethernet port at desk {desk} gives no connection, there is no link light.",
            "user",
        ),
        ("DNS errors on intranet", "Internal sites like intranet.globex.local fail with DNS errors.", "site"),
        (
            "Network very slow",
            "The network is extremely slow, pages take a minute to load and Teams calls drop.",
            "site",
        ),
        (
            "Firewall blocking supplier portal",
            "The firewall seems to be blocking the supplier portal on port 8443.",
            "site",
        ),
        (
            "Packet loss on VPN",
            "Lots of packet loss on the VPN from home, ping to the gateway is all over the place.",
            "user",
        ),
        ("No IP address", "My laptop gets a 169.254 address on the wired network, so no connection at all.", "user"),
        (
            "Switch lights flashing",
            "The switch in the comms room has orange lights flashing and the desks on that side have no network.",
            "wide",
        ),
    ],
    "identity": [
        ("Locked out", "I'm locked out of my account after too many password attempts.", "user"),
        ("MFA push not arriving", "MFA push notifications aren't arriving on my phone so I can't sign in.", "site"),
        ("SSO login loop", "The SSO login keeps looping back to the Okta page.", "site"),
        ("Account disabled", "My account says it is disabled when I try to log in.", "user"),
        ("Password reset link expired", "The password reset link says it has expired every time I use it.", "user"),
        ("Lost group access", "I lost access to the {group} group, I get permission denied.", "user"),
        ("New phone, MFA broken", "I changed phones and now I can't pass MFA with the authenticator app.", "user"),
        ("Okta rejects password", "Okta says my new password doesn't meet the policy but it does.", "user"),
        ("Single sign-on down", "Single sign-on returns an error page for every app that uses Okta.", "wide"),
    ],
    "hardware": [
        ("Laptop won't power on", "My laptop won't power on, even when it's plugged in.", "user"),
        ("Dock not detecting monitor", "The docking station isn't detecting my second monitor.", "user"),
        ("Battery drains fast", "The laptop battery drains from full in under an hour.", "user"),
        ("Printer jammed", "The printer on floor {floor} is jammed and shows error 50.4.", "site"),
        ("Dead keys on keyboard", "Several keys on my laptop keyboard have stopped working.", "user"),
        ("Monitor flickering", "My monitor flickers and goes black every few minutes.", "user"),
        ("Headset mic not working", "My headset microphone isn't picked up by the laptop.", "user"),
        ("Laptop overheating", "The laptop fan is very loud and the machine is overheating.", "user"),
        (
            "Laptops won't boot after BIOS update",
            "Laptops that got last night's BIOS update won't boot past the logo.",
            "wide",
        ),
        (
            "Meeting room screens dead",
            "The meeting room displays and the docking stations on floor {floor} have no power.",
            "wide",
        ),
    ],
    "email": [
        ("Outlook won't sync", "Outlook keeps asking for my password and the mailbox won't sync.", "site"),
        ("External mail bouncing", "Emails to external addresses bounce back with a 550 error.", "site"),
        ("Mailbox full", "My mailbox is full and I can't send any email.", "user"),
        ("Shared mailbox missing", "The shared mailbox {mbx}@globex.com has disappeared from Outlook.", "user"),
        (
            "Calendar invites broken",
            "Calendar invites from outside arrive as plain text emails with no accept button.",
            "site",
        ),
        ("Phishing getting through", "Lots of phishing emails are getting past the spam filter into inboxes.", "wide"),
        ("Attachments not sending", "Emails with attachments over 5 MB never arrive.", "user"),
        ("Outlook crashes", "Outlook crashes as soon as I open it.", "user"),
    ],
    "database": [
        ("Queries timing out", "Queries against the {db} database are timing out.", "site"),
        ("ETL deadlock", "The nightly ETL job failed with a deadlock error on the orders table.", "site"),
        (
            "Slow report query",
            "My saved SQL query on the {db} database now takes ten minutes instead of seconds.",
            "user",
        ),
        (
            "DB login failed",
            "I get 'login failed for user' when connecting to the {db} database from SQL Management Studio.",
            "user",
        ),
        ("Replication stuck", "The reporting database still shows yesterday's data, replication looks stuck.", "site"),
        ("Too many connections", "The app logs show 'too many connections' errors from Postgres.", "site"),
        ("SQL Server at 100% CPU", "The SQL Server instance for {db} is at 100% CPU.", "site"),
        ("DB backup failed", "Last night's backup job for the {db} database failed.", "site"),
        (
            "Report query returns wrong totals",
            "My SQL report against the {db} database returns wrong totals since the schema migration.",
            "user",
        ),
        (
            "Database connection refused",
            "My client gets 'connection refused' from the {db} database on port 5432.",
            "user",
        ),
    ],
}
GLOBEX_REQUESTS = {
    "network": [
        ("Second network port", "Could I get a second network port patched at desk {desk}?"),
        ("VPN on home PC", "How do I connect to the VPN from my home PC?"),
        ("Guest Wi-Fi for visitors", "Is there a guest Wi-Fi password I can give to visitors next week?"),
        (
            "Wi-Fi for new meeting room",
            "Could you extend the wireless network to the new meeting room on floor {floor}?",
        ),
        ("Static IP request", "What's the process for requesting a static IP for a lab device?"),
        (
            "Open firewall port",
            "Can you open a firewall rule for the new vendor portal? Nothing is broken yet, it goes live next month.",
        ),
    ],
    "identity": [
        ("Access group request", "Could you add me to the {group} access group?"),
        ("Changing password", "How do I change my password before it expires?"),
        ("New starter account", "Please create an account for a new starter in {dept} who begins on Monday."),
        ("Register MFA device", "How do I register a second device for MFA?"),
        ("Leaver access removal", "Please remove a leaver's access and disable their account at the end of the week."),
        ("Admin rights question", "Is it possible to get temporary admin rights on my account to install software?"),
    ],
    "hardware": [
        ("Second monitor", "Could I order a second monitor for my desk?"),
        ("Spare charger", "Can I get a spare laptop charger for working from home?"),
        ("Laptop refresh date", "When is my laptop due for a hardware refresh?"),
        ("Loaner laptop", "Can I borrow a loaner laptop for a trip next month?"),
        ("Ergonomic keyboard", "Is it possible to request an ergonomic keyboard and mouse?"),
        ("Laptop for new starter", "Please prepare a laptop and docking station for a new starter in {dept}."),
    ],
    "email": [
        ("New distribution list", "Could you create a distribution list for the {dept} team?"),
        ("Shared mailbox access", "Please add the {mbx}@globex.com shared mailbox to my Outlook."),
        ("Out-of-office", "How do I set up an out-of-office reply in Outlook?"),
        ("Bigger mailbox", "Can my mailbox quota be increased?"),
        ("Email signature", "How do I update my email signature with the new logo?"),
        ("Mail forwarding", "Can you forward a leaver's email to their manager for 30 days?"),
    ],
    "database": [
        ("Read-only DB access", "Could I get read-only access to the {db} database for reporting?"),
        ("Restore test DB", "Please restore the {db} test database from last Friday's backup."),
        ("New schema", "How do I request a new schema in the analytics warehouse?"),
        ("Index request", "Can you add an index to speed up the customer search query?"),
        ("DB upgrade window", "When is the maintenance window for the {db} database upgrade?"),
    ],
}
GLOBEX_IMPACT = {
    "P1": [
        "It's not just me: nobody in the {site} office can work.",
        "The whole {site} office is affected, everyone on site is down.",
        "This is hitting the entire {dept} department, around {n} people.",
        "All {n} people on floor {floor} have the same problem.",
        "Every user at the {site} site is affected right now.",
        "Company-wide outage: all {site} staff are affected and work has stopped.",
        "Nobody in {dept} can do anything, it's the whole team of {n}.",
    ],
    "P2": [
        "I'm completely blocked and can't do any work until this is fixed.",
        "I can't work at all right now.",
        "It's only me, but I'm stuck and can't get anything done.",
        "I can't do my job until this works again.",
        "It's just my machine, but I'm fully blocked.",
        "I have a deadline today and I'm completely stuck.",
    ],
    "P3": [
        "It's annoying but I can work around it.",
        "Not a big deal, it only happens now and then.",
        "I can keep working, it just slows me down a bit.",
        "Restarting fixes it for a while, so low impact.",
        "Minor issue, it happens a couple of times a day.",
        "There's a workaround, it's just irritating.",
    ],
    "P4": [
        "No rush, whenever someone has time.",
        "Just a question, nothing is broken.",
        "Not urgent at all.",
        "",
        "",
        "Thanks in advance.",
    ],
}
GLOBEX_DETAILS = [
    "I already restarted twice.",
    "It started this morning around 9:40.",
    "Screenshot attached.",
    "I'm working from home today.",
    "Asset tag GX-{tag}.",
    "It was fine yesterday.",
    "I'm working from the {site} office today.",
    "",
]
GLOBEX_GREETINGS = ["Hi IT,", "Hello,", "Hi team,", "Hi,", "Morning,", "Hello helpdesk,", ""]
GLOBEX_SYSTEMS = [
    'You are Globex IT helpdesk triage. Route the ticket: reply with JSON {"team": ..., "priority": ...}.',
    "Route this helpdesk ticket. Answer with the team and priority as JSON.",
    "You triage Globex IT tickets into a team (network, identity, hardware, email, database) and a priority "
    "(P1-P4). Reply with compact JSON only.",
]
FOLLOWUPS = {
    "to_P1": [
        "Update: now everyone in the {site} office has the same problem, nobody can work.",
        "It's spread: the whole {dept} department is affected now, about {n} people.",
        "Update - every user on floor {floor} is seeing this now.",
    ],
    "to_P2": [
        "Update: it got worse, I can't work at all now.",
        "Follow-up: this is now blocking me completely, I can't do my job.",
        "Now I'm fully blocked, nothing works.",
    ],
    "to_P3": [
        "Update: a restart fixed it for now, so I can work around it. It just keeps coming back now and then.",
        "Found a workaround, so it's only annoying now.",
        "It's better now, I can keep working; it only happens occasionally.",
    ],
    "reroute": [
        "Sorry, I described that wrong. The real problem is: {body}",
        "Correction from my side: {body}",
        "Actually it's something else: {body}",
    ],
}


def globex_fill(rng: random.Random, s: str, ctx: dict | None = None) -> str:
    """Fill a template; ctx pins the sender's site and department so the impact text agrees with them."""
    ctx = ctx or {}
    return s.format(
        desk=f"{rng.choice('ABCDEF')}{rng.randint(1, 48)}",
        floor=rng.randint(1, 6),
        group=rng.choice(GROUPS),
        db=rng.choice(DBS),
        mbx=rng.choice(MAILBOXES),
        dept=ctx.get("dept") or rng.choice(DEPTS),
        site=ctx.get("site") or rng.choice(SITES),
        n=rng.randint(12, 240),
        tag=rng.randint(1000, 9999),
    )


def problem_pool(team: str, prio: str) -> list[tuple[str, str, str]]:
    scopes = ("site", "wide") if prio == "P1" else ("user", "site")
    return [x for x in GLOBEX_PROBLEMS[team] if x[2] in scopes]


def globex_ticket(rng: random.Random, team: str, prio: str) -> tuple[str, dict]:
    """A ticket text and its context (sender site and department, for follow-ups)."""
    ctx = {"site": rng.choice(SITES), "dept": rng.choice(DEPTS)}
    if prio == "P4":
        subject, body = rng.choice(GLOBEX_REQUESTS[team])
    else:
        subject, body, _ = rng.choice(problem_pool(team, prio))
    body = globex_fill(rng, body, ctx)
    impact = globex_fill(rng, rng.choice(GLOBEX_IMPACT[prio]), ctx)
    detail = globex_fill(rng, rng.choice(GLOBEX_DETAILS), ctx) if prio != "P4" and rng.random() < 0.5 else ""
    sentences = [body] + ([detail] if detail else [])
    if impact:
        if prio in ("P1", "P2") and rng.random() < 0.3:
            sentences.insert(0, impact)
        else:
            sentences.append(impact)
    greeting = rng.choice(GLOBEX_GREETINGS)
    name = rng.choice(FIRST_NAMES) + " " + rng.choice(LAST_NAMES)
    sender = f"From: {name} ({ctx['dept']}, {ctx['site']})"
    head = f"Subject: {subject}\n{sender}\n\n" if rng.random() < 0.8 else ""
    text = head + (greeting + "\n" if greeting else "") + " ".join(sentences)
    if rng.random() < 0.5:
        text += "\n\n" + rng.choice(
            ["Thanks", "Thanks,\n" + name.split()[0], "Cheers", "Regards,\n" + name, name.split()[0]]
        )
    if rng.random() < 0.08:
        text = add_typo(rng, text, [])
    return text, ctx


def glabel(team: str, prio: str) -> str:
    return dumps({"team": team, "priority": prio})


def globex_followup(rng: random.Random, team: str, prio: str, ctx: dict) -> tuple[str, str, str]:
    """A follow-up user turn after the first answer: (text, new team, new priority)."""
    options = {
        "P1": ["to_P2", "reroute"],
        "P2": ["to_P1", "to_P3", "reroute"],
        "P3": ["to_P1", "to_P2", "reroute"],
        "P4": ["to_P2"],
    }[prio]
    kind = rng.choice(options)
    if kind == "to_P2" and prio == "P1":
        return (
            rng.choice(
                [
                    "Update: the rest of the office is back, it's only me now but I still can't work at all.",
                    "Most people are fine again. I'm still completely blocked though.",
                ]
            ),
            team,
            "P2",
        )
    if kind == "reroute":
        other = rng.choice([t for t in GLOBEX_TEAMS if t != team])
        body = globex_fill(rng, rng.choice(problem_pool(other, prio))[1], ctx)
        text = (
            rng.choice(FOLLOWUPS["reroute"]).format(body=body)
            + " "
            + globex_fill(rng, rng.choice(GLOBEX_IMPACT[prio]), ctx)
        )
        return text, other, prio
    return globex_fill(rng, rng.choice(FOLLOWUPS[kind]), ctx), team, kind[3:]


def long_vpn_log(rng: random.Random) -> str:
    head = (
        "Subject: VPN keeps dropping\nFrom: Kwame Adeyemi (Sales, Leeds)\n\nHi IT,\nMy VPN connection drops "
        "every few minutes and I have to reconnect. I'm completely blocked. Full client log below:\n\n"
    )
    lines = []
    t = 0
    while len(head) + sum(len(x) + 1 for x in lines) < MAX_CHARS + 4000:
        t += rng.randint(1, 9)
        lines.append(
            f"2024-03-14 09:{(t // 60) % 60:02d}:{t % 60:02d}.{rng.randint(0, 999):03d} "
            f"[{rng.choice(['INFO', 'WARN', 'ERROR'])}] tunnel[{rng.randint(1, 4)}]: "
            + rng.choice(
                [
                    "DPD timeout, peer 203.0.113.7 not responding",
                    f"re-keying IKE SA, spi=0x{rng.getrandbits(32):08x}",
                    "keepalive sent, no reply",
                    "interface utun3 down, reconnecting",
                    "TLS handshake ok, session resumed",
                    "MTU probe 1400 failed, falling back to 1280",
                ]
            )
        )
    return head + "\n".join(lines)


# ====================================================================================== writers


def jsonl_bytes(lines: list) -> bytes:
    """lines: dicts (serialised) or raw bytes (written as-is, a defect)."""
    out = bytearray()
    for item in lines:
        out += item if isinstance(item, bytes) else json.dumps(item, ensure_ascii=False).encode("utf-8")
        out += b"\n"
    return bytes(out)


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def parquet_bytes(rows: list[dict]) -> bytes:
    schema = pa.schema(
        [("id", pa.string()), ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1000, write_statistics=False)
    return sink.getvalue().to_pybytes()


class Builder:
    """Collects one tenant's files and its manifest entries."""

    def __init__(self, tenant: str):
        self.tenant = tenant
        self.files: dict[str, bytes] = {}
        self.valid: dict[str, int] = {}
        self.rejects: list[dict] = []
        self.duplicates: list[dict] = []
        self.rows_in: dict[str, int] = {}
        self.unreadable: list[dict] = []
        self.documents: list[str] = []
        self.seen: dict[str, tuple[str, int]] = {}  # normalized user text -> (file, row), to forbid accidental dups

    def check_unique(self, fname: str, row: int, user_text: str) -> None:
        key = norm_ws(user_text)
        assert key not in self.seen, f"accidental duplicate {fname}:{row} of {self.seen[key]}"
        self.seen[key] = (fname, row)

    def reject(self, fname: str, row: int | None, reason: str, field: str | None, what: str) -> None:
        self.rejects.append({"file": fname, "row": row, "reason": reason, "field": field, "defect": what})

    def duplicate(self, fname: str, row: int, of_row: int, what: str) -> None:
        self.duplicates.append(
            {"file": fname, "row": row, "duplicate_of": {"file": fname, "row": of_row}, "defect": what}
        )

    def manifest(self) -> dict:
        rows_in = sum(self.rows_in.values()) + len(self.unreadable)
        valid = sum(self.valid.values())
        assert rows_in == valid + len(self.rejects) + len(self.duplicates), self.tenant
        return {
            "files": sorted(self.files),
            "documents": sorted(self.documents),
            "rows_in_by_file": dict(sorted(self.rows_in.items())),
            "valid_rows_by_file": dict(sorted(self.valid.items())),
            "valid_rows": valid,
            "rows_in": rows_in,
            "rejected": len(self.rejects),
            "duplicates": len(self.duplicates),
            "expected_rejects": self.rejects,
            "expected_duplicates": self.duplicates,
            "unreadable_files": self.unreadable,
        }


def build_acme(n_q2: int = ACME_Q2_ROWS) -> tuple[Builder, dict]:
    rng = random.Random(20240117)
    b = Builder("acme-shop")
    n_jsonl, n_csv, n_chat = 345, 225, 230
    orders = [str(x) for x in rng.sample(range(10000, 100000), n_jsonl + n_csv + n_chat + 10)]
    stats = {"intent": {}, "category": {}, "urgent": {}}
    seen: set[str] = set()

    def count(label_json: str) -> None:
        lab = json.loads(label_json)
        for k in stats:
            stats[k][str(lab[k]).lower()] = stats[k].get(str(lab[k]).lower(), 0) + 1

    # ---- JSONL, alpaca shape
    fname = "orders_email_2024q1.jsonl"
    rows = acme_rows(rng, n_jsonl, orders[:n_jsonl], seen)
    lines: list = []
    for text, label in rows:
        lines.append({"instruction": rng.choice(ACME_INSTRUCTIONS), "input": text, "output": label})
    valid_lines = list(lines)
    # defects, inserted at fixed positions (positions are in the final file, 1-based)
    extra_order = orders[-10:]
    t1, l1 = acme_email(rng, "cancel", "bath", False, extra_order[0])
    t2, l2 = acme_email(rng, "track", "lighting", True, extra_order[1])
    t3, _ = acme_email(rng, "return", "decor", False, extra_order[2])
    t4, l4 = acme_email(rng, "exchange", "bedding", False, extra_order[3])
    truncated = json.dumps({"instruction": ACME_INSTRUCTIONS[0], "input": t1, "output": dumps(l1)}, ensure_ascii=False)
    truncated = truncated[: len(truncated) * 2 // 3].encode("utf-8")
    missing = {"instruction": ACME_INSTRUCTIONS[0], "input": t2}
    wrongtype = {"instruction": ACME_INSTRUCTIONS[3], "input": t3, "output": int(extra_order[2])}
    t4 = t4 + "\n\nRen\udce9e"  # a lone surrogate-escaped byte: encodes back to the single byte 0xE9
    latin1 = json.dumps(
        {"instruction": ACME_INSTRUCTIONS[0], "input": t4, "output": dumps(l4)}, ensure_ascii=False
    ).encode("utf-8", "surrogateescape")
    plan = [
        (41, truncated, "malformed_json", None, "line cut off mid-object (export interrupted)"),
        (97, missing, "missing_field", "output", "row has instruction and input but no output"),
        (158, wrongtype, "wrong_type", "output", f"output is the number {extra_order[2]}, not a JSON string"),
        (230, latin1, "invalid_utf8", None, "customer name written in latin-1 (byte 0xE9), not UTF-8"),
    ]
    for pos, item, reason, field, what in plan:
        lines.insert(pos - 1, item)
        b.reject(fname, pos, reason, field, what)
    dup_src = 120
    assert isinstance(lines[dup_src - 1], dict)
    lines.insert(300 - 1, lines[dup_src - 1])
    b.duplicate(fname, 300, dup_src, "exact copy of an earlier line")
    for i, item in enumerate(lines, start=1):
        if isinstance(item, dict) and i != 300 and "output" in item and isinstance(item["output"], str):
            b.check_unique(fname, i, item["instruction"] + "\n" + item["input"])
    b.files[fname] = jsonl_bytes(lines)
    b.rows_in[fname] = len(lines)
    b.valid[fname] = len(valid_lines)
    for item in valid_lines:
        count(item["output"])

    # ---- CSV, prompt/completion shape
    fname = "support_inbox_export.csv"
    rows = acme_rows(rng, n_csv, orders[n_jsonl : n_jsonl + n_csv], seen)
    recs = []
    for text, label in rows:
        recs.append([rng.choice(ACME_INSTRUCTIONS) + "\n\n" + text, label])
        count(label)
    valid_n = len(recs)
    t5, l5 = acme_email(rng, "change_address", "kitchen", True, extra_order[4])
    t6, _ = acme_email(rng, "refund", "decor", False, extra_order[5])
    recs.insert(64 - 1, ["", dumps(l5)])
    b.reject(fname, 64, "empty_field", "prompt", "prompt cell is empty (completion present)")
    recs.insert(151 - 1, [ACME_INSTRUCTIONS[0] + "\n\n" + t6, "   "])
    b.reject(fname, 151, "empty_field", "completion", "completion is whitespace only")
    src = 88
    p = recs[src - 1][0]
    ws = "  " + p.replace(". ", ".  ", 1) + " \n"
    assert ws != p and norm_ws(ws) == norm_ws(p)
    recs.insert(190 - 1, [ws, recs[src - 1][1]])
    b.duplicate(fname, 190, src, "same prompt and completion with extra spaces and a trailing newline")
    for i, (pr, comp) in enumerate(recs, start=1):
        if i not in (64, 151, 190):
            b.check_unique(fname, i, pr)
    b.files[fname] = csv_bytes(["prompt", "completion"], recs)
    b.rows_in[fname] = len(recs)
    b.valid[fname] = valid_n

    # ---- JSON array, OpenAI chat shape
    fname = "chat_transcripts.json"
    rows = acme_rows(rng, n_chat, orders[n_jsonl + n_csv : n_jsonl + n_csv + n_chat], seen)
    elems = []
    for text, label in rows:
        elems.append(
            {
                "messages": [
                    {"role": "system", "content": rng.choice(ACME_SYSTEMS)},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": label},
                ]
            }
        )
        count(label)
    valid_n = len(elems)
    t7, l7 = acme_email(rng, "return", "kitchen", False, extra_order[6])
    t8, _ = acme_email(rng, "track", "furniture", True, extra_order[7])
    long_text, long_label = long_email_thread(rng, extra_order[8])
    elems.insert(
        33 - 1,
        {
            "messages": [
                {"role": "system", "content": ACME_SYSTEMS[0]},
                {"role": "user", "content": t7},
                {"role": "bot", "content": dumps(l7)},
            ]
        },
    )
    b.reject(fname, 33, "unknown_role", "messages", 'answer turn has role "bot"')
    elems.insert(
        118 - 1, {"messages": [{"role": "system", "content": ACME_SYSTEMS[1]}, {"role": "user", "content": t8}]}
    )
    b.reject(fname, 118, "no_assistant_turn", "messages", "conversation ends with the user turn, no answer")
    elems.insert(
        201 - 1,
        {
            "messages": [
                {"role": "system", "content": ACME_SYSTEMS[0]},
                {"role": "user", "content": long_text},
                {"role": "assistant", "content": long_label},
            ]
        },
    )
    assert len(long_text) > MAX_CHARS
    b.reject(fname, 201, "too_long", None, f"customer pasted the whole quoted thread ({len(long_text)} characters)")
    for i, e in enumerate(elems, start=1):
        if i not in (33, 118, 201):
            b.check_unique(fname, i, e["messages"][1]["content"])
    body = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in elems) + "\n]\n"
    b.files[fname] = body.encode("utf-8")
    b.rows_in[fname] = len(elems)
    b.valid[fname] = valid_n

    # ---- JSONL, alpaca shape: the next quarter's export, clean. Drawn after every other acme file, so
    # adding it left those files byte-identical; its order numbers are new ones.
    fname = "orders_email_2024q2.jsonl"
    used = set(orders)
    q2_orders = [str(x) for x in rng.sample([x for x in range(10000, 100000) if str(x) not in used], n_q2)]
    lines = [
        {"instruction": rng.choice(ACME_INSTRUCTIONS), "input": text, "output": label}
        for text, label in acme_rows(rng, n_q2, q2_orders, seen)
    ]
    for i, item in enumerate(lines, start=1):
        b.check_unique(fname, i, item["instruction"] + "\n" + item["input"])
        count(item["output"])
    b.files[fname] = jsonl_bytes(lines)
    b.rows_in[fname] = b.valid[fname] = len(lines)

    for name, text in ACME_DOCS.items():
        b.files[name] = text.encode("utf-8")
        b.documents.append(name)
    return b, stats


def build_globex() -> tuple[Builder, dict]:
    rng = random.Random(20240322)
    b = Builder("globex-it")
    stats = {"team": {}, "priority": {}}

    def count(label_json: str) -> None:
        lab = json.loads(label_json)
        for k in stats:
            stats[k][lab[k]] = stats[k].get(lab[k], 0) + 1

    last_ctx: dict = {}

    def unique_ticket(team: str, prio: str) -> str:
        for _ in range(50):
            t, ctx = globex_ticket(rng, team, prio)
            if norm_ws(t) not in b.seen:
                last_ctx.clear()
                last_ctx.update(ctx)
                return t
        raise AssertionError("could not make a unique ticket")

    # ---- Parquet, sharegpt shape
    fname = "tickets_2024_export.parquet"
    n_pq = 420
    teams = balanced(rng, GLOBEX_TEAMS, n_pq)
    prios = balanced(rng, GLOBEX_PRIORITIES, n_pq)
    rows = []
    for i in range(n_pq):
        text = unique_ticket(teams[i], prios[i])
        b.seen[norm_ws(text)] = (fname, -1)
        convo = [{"from": "system", "value": rng.choice(GLOBEX_SYSTEMS)}] if rng.random() < 0.7 else []
        convo += [{"from": "human", "value": text}, {"from": "gpt", "value": glabel(teams[i], prios[i])}]
        rows.append(convo)
        count(glabel(teams[i], prios[i]))
    valid_n = len(rows)

    def defect_ticket(team, prio):
        t = unique_ticket(team, prio)
        b.seen[norm_ws(t)] = (fname, -1)
        return t

    ta = defect_ticket("email", "P2")
    tb = defect_ticket("hardware", "P3")
    tc = defect_ticket("network", "P3")
    rows.insert(57 - 1, [{"from": "human", "value": ta}, {"from": "gpt", "value": " \n "}])
    b.reject(fname, 57, "empty_field", "conversations", "gpt answer is whitespace only")
    rows.insert(
        173 - 1,
        [
            {"from": "system", "value": GLOBEX_SYSTEMS[0]},
            {"from": "human", "value": tb},
            {"from": "bot", "value": glabel("hardware", "P3")},
        ],
    )
    b.reject(fname, 173, "unknown_role", "conversations", 'answer turn has from "bot"')
    rows.insert(
        260 - 1,
        [
            {"from": "system", "value": GLOBEX_SYSTEMS[1]},
            {"from": "human", "value": tc},
            {"from": "gpt", "value": glabel("network", "P3")},
            {"from": "human", "value": globex_fill(rng, FOLLOWUPS["to_P1"][0], last_ctx)},
        ],
    )
    b.reject(
        fname, 260, "no_assistant_turn", "conversations", "ends with the user's follow-up, which was never answered"
    )
    src = 140
    rows.insert(333 - 1, rows[src - 1])
    b.duplicate(fname, 333, src, "exact copy of an earlier row (exported twice)")
    ids = [f"GX-2024-{10000 + 7 * i:06d}" for i in range(1, len(rows) + 1)]
    ids[333 - 1] = ids[src - 1]  # an exact copy: same ticket id, same conversation
    recs = [{"id": i, "conversations": c} for i, c in zip(ids, rows)]
    b.files[fname] = parquet_bytes(recs)
    b.rows_in[fname] = len(rows)
    b.valid[fname] = valid_n

    # ---- JSONL, OpenAI messages shape, some multi-turn
    fname = "helpdesk_chats.jsonl"
    n_jl = 360
    teams = balanced(rng, GLOBEX_TEAMS, n_jl)
    prios = balanced(rng, GLOBEX_PRIORITIES, n_jl)
    multi = [i < round(n_jl * 0.35) for i in range(n_jl)]
    rng.shuffle(multi)
    lines: list = []
    for i in range(n_jl):
        text = unique_ticket(teams[i], prios[i])
        b.seen[norm_ws(text)] = (fname, -1)
        msgs = [{"role": "system", "content": rng.choice(GLOBEX_SYSTEMS)}] if rng.random() < 0.8 else []
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": glabel(teams[i], prios[i])}]
        count(glabel(teams[i], prios[i]))
        if multi[i]:
            fu, t2, p2 = globex_followup(rng, teams[i], prios[i], last_ctx)
            msgs += [{"role": "user", "content": fu}, {"role": "assistant", "content": glabel(t2, p2)}]
            count(glabel(t2, p2))
        lines.append({"messages": msgs})
    valid_n = len(lines)
    td = defect_ticket("identity", "P2")
    te = defect_ticket("database", "P1")
    tf = defect_ticket("email", "P4") + "\n\nJ\udcfcrgen"
    trunc = json.dumps(
        {"messages": [{"role": "user", "content": td}, {"role": "assistant", "content": glabel("identity", "P2")}]},
        ensure_ascii=False,
    )
    trunc = trunc[: len(trunc) // 2].encode("utf-8")
    as_string = {
        "messages": json.dumps(
            [{"role": "user", "content": te}, {"role": "assistant", "content": glabel("database", "P1")}]
        )
    }
    latin = json.dumps(
        {"messages": [{"role": "user", "content": tf}, {"role": "assistant", "content": glabel("email", "P4")}]},
        ensure_ascii=False,
    ).encode("utf-8", "surrogateescape")
    log = long_vpn_log(rng)
    assert len(log) > MAX_CHARS
    too_long = {
        "messages": [
            {"role": "system", "content": GLOBEX_SYSTEMS[0]},
            {"role": "user", "content": log},
            {"role": "assistant", "content": glabel("network", "P2")},
        ]
    }
    plan = [
        (25, trunc, "malformed_json", None, "line cut off mid-object"),
        (111, as_string, "wrong_type", "messages", "messages is a JSON-encoded string, not a list"),
        (205, latin, "invalid_utf8", None, "requester name in latin-1 (byte 0xFC), not UTF-8"),
        (290, too_long, "too_long", None, f"user pasted a full VPN client log ({len(log)} characters)"),
    ]
    for pos, item, reason, field, what in plan:
        lines.insert(pos - 1, item)
        b.reject(fname, pos, reason, field, what)
    src = 150
    orig = lines[src - 1]
    assert isinstance(orig, dict) and isinstance(orig["messages"], list)
    ws_copy = json.loads(json.dumps(orig))
    u = next(m for m in ws_copy["messages"] if m["role"] == "user")
    u["content"] = u["content"].replace(" ", "  ", 2) + "  \n"
    assert u["content"] != next(m for m in orig["messages"] if m["role"] == "user")["content"]
    lines.insert(340 - 1, ws_copy)
    b.duplicate(fname, 340, src, "same conversation with doubled spaces and trailing whitespace in the ticket")
    b.files[fname] = jsonl_bytes(lines)
    b.rows_in[fname] = len(lines)
    b.valid[fname] = valid_n

    # ---- a truncated parquet export: the whole file is unreadable
    fname = "tickets_2023_q4_export_corrupt.parquet"
    old = []
    for i in range(40):
        team, prio = rng.choice(GLOBEX_TEAMS), rng.choice(GLOBEX_PRIORITIES)
        old.append(
            {
                "id": f"GX-2023-{90000 + i:06d}",
                "conversations": [
                    {"from": "human", "value": globex_ticket(rng, team, prio)[0]},
                    {"from": "gpt", "value": glabel(team, prio)},
                ],
            }
        )
    data = parquet_bytes(old)
    b.files[fname] = data[: len(data) * 3 // 5]
    b.unreadable.append(
        {
            "file": fname,
            "row": None,
            "reason": "unreadable_file",
            "field": None,
            "defect": "export truncated at 60% of its bytes: no Parquet footer",
        }
    )
    b.reject(fname, None, "unreadable_file", None, "export truncated at 60% of its bytes: no Parquet footer")

    for name, text in GLOBEX_DOCS.items():
        b.files[name] = text.encode("utf-8")
        b.documents.append(name)
    return b, stats


# ====================================================================================== documents

ACME_DOCS = {
    "returns_policy.md": """# Acme Home returns, refunds and exchanges

_Last updated: January 2024_

We want you to love everything you bring home from Acme Home. If something isn't right, this page
explains what you can do and how long it takes.

## Returns

You can return most items within **30 days of delivery** for any reason. Items must be unused, with
their original tags and packaging. To start a return, reply to your order confirmation email or write
to help@acmehome.example with your five-digit order number. We will email you a prepaid return label
within one business day. Drop the parcel at any carrier pickup point; you do not need to print the
label if your carrier accepts QR codes.

Some items cannot be returned: mattress toppers and pillows that have been unwrapped, personalised
items, candles that have been lit, and anything marked "final sale" on the product page.

Large furniture (sofas, tables, bookshelves, cabinets) is collected from your home. A collection fee
of $39 is deducted from the refund unless the item arrived damaged or faulty.

## Refunds

Refunds go back to the original payment method. Once the returned item reaches our warehouse it is
inspected within three business days, and the refund is issued the same day. Your bank may take a
further five to seven business days to show it on your statement.

If an item arrives damaged, or never arrives at all, we refund it in full without asking you to send
anything back. Please email us photos of the damage within 14 days so we can claim from the carrier.
If you were charged twice for the same order, let us know and we will refund the duplicate charge
immediately.

## Exchanges

Exchanges for a different size, colour or finish are free. We ship the replacement as soon as the
carrier scans your return, so you are never without the item for long. If the new option costs more,
we will send a payment link for the difference; if it costs less, the difference is refunded.

## Cancellations and address changes

Orders can be cancelled or redirected to a new delivery address until they are handed to the carrier,
usually within 24 hours of ordering. After that, the parcel can still be returned as normal once it
arrives. Please include your order number in every message: it is the fastest way for us to find your
order.
""",
    "shipping_faq.md": """# Shipping and delivery FAQ

**How long does delivery take?**
Small items (kitchenware, bedding, bath textiles, lamps and decor) ship from our Ohio warehouse within
one business day and arrive in two to five business days. Furniture is delivered by a two-person team
in five to ten business days; the carrier will text you to book a two-hour delivery window.

**How much does shipping cost?**
Standard shipping is free on orders over $75. Below that it is a flat $6.95. Express delivery (one to
two business days) is $14.95 for small items and is not available for furniture.

**How do I track my order?**
As soon as your parcel leaves the warehouse we email a tracking link. You can also find it under
"My orders" in your account. Tracking can take up to 24 hours to show the first scan, so don't worry
if the page looks empty at first. If your tracking has not moved for more than five business days,
contact us with your order number and we will open an investigation with the carrier.

**My tracking says delivered, but I don't have the parcel.**
Check with neighbours and around your porch or mailroom, and wait until the end of the next business
day, as carriers sometimes scan parcels early. If it still hasn't turned up, email us and we will
either reship the order or refund it in full.

**Can I change my delivery address?**
Yes, as long as the order hasn't been handed to the carrier. Reply to your confirmation email with the
new address. Once the parcel is in transit, we can sometimes ask the carrier to redirect it, but we
can't guarantee it.

**Do you ship outside the US?**
We currently ship to all 50 states and to Canada. Canadian orders may be charged import duties on
delivery.

**Can I get something urgently?**
Choose Express at checkout. If you have a deadline, such as a gift or a move, tell us in your message
and our team will prioritise your request. We answer urgent emails first, usually within two hours
during business hours (Monday to Friday, 8am to 6pm Eastern).

**Why did my order arrive in several boxes?**
Items ship from different parts of the warehouse, and large pieces are packed separately to keep them
safe. Each box has its own tracking number in your shipping email.
""",
    "product_care_guide.txt": """ACME HOME - PRODUCT CARE GUIDE

Looking after your pieces helps them last for years. These are the basics our customer team gets asked
about most often.

LINEN AND COTTON BEDDING
Wash duvet covers, sheets and pillowcases at 40C on a gentle cycle with a mild detergent. Avoid
bleach and fabric softener, which weaken linen fibres. Tumble dry on low or line dry in the shade.
Linen softens with every wash; a few creases are part of its character. Silk pillowcases should be
hand washed in cool water and dried flat.

BATH TOWELS AND ROBES
Wash new towels twice before first use to remove the finishing and increase absorbency. Wash at 40C
to 60C and skip the softener, which coats the loops. Shake towels before drying to lift the pile. A
pulled loop can be trimmed with scissors; never pull it.

CAST IRON AND ENAMEL COOKWARE
Our cast-iron skillets arrive pre-seasoned. Rinse with hot water, dry straight away on a low flame,
and rub a few drops of oil into the surface. Enamelled Dutch ovens are dishwasher safe, but hand
washing keeps the glaze bright. Avoid metal utensils on enamel and never plunge a hot pot into cold
water.

WOOD FURNITURE
Oak and walnut tables are finished with a hard wax oil. Wipe spills promptly with a damp cloth and use
coasters for hot drinks. Re-oil the surface once or twice a year with the care kit included in the
box. Keep furniture away from radiators and direct sunlight to prevent splitting and fading.

LAMPS AND LIGHTING
Always switch off and unplug a lamp before cleaning. Dust rattan and pleated shades with a soft brush.
Use bulbs no stronger than the wattage printed on the lamp holder. Outdoor string lights are rated
for covered outdoor spaces and should be stored indoors over winter.

RUGS AND DECOR
Vacuum jute and wool rugs weekly without the beater bar. Blot spills, don't rub them. Rotate rugs
every few months for even wear. Ceramic vases are glazed inside and watertight; wipe them with a damp
cloth. Candles burn best when the wick is trimmed to 5 mm before each use.

If something doesn't look right after following this guide, write to help@acmehome.example with your
order number and a photo, and we will help.
""",
}

GLOBEX_DOCS = {
    "ticket_priority_and_routing.md": """# Globex IT helpdesk: ticket priority and routing

Every ticket that reaches the service desk gets a resolver team and a priority. This page is the
reference the triage rota works from.

## Teams

- **network**: VPN, office Wi-Fi, wired ports, switches, DNS, firewall rules, network drives that
  time out. If the symptom is "can't reach" or "no connection", start here.
- **identity**: accounts, passwords, lockouts, MFA and the authenticator app, Okta single sign-on,
  access groups, new starter and leaver accounts.
- **hardware**: laptops, docking stations, monitors, keyboards, headsets, printers, meeting room
  displays, chargers and hardware refreshes.
- **email**: Outlook, mailboxes and quotas, shared mailboxes, distribution lists, calendar invites,
  bounced mail, spam and phishing.
- **database**: SQL Server and Postgres instances, slow or failing queries, replication, backups, ETL
  jobs, database access requests and restores.

When a ticket mentions several things, route on the thing that is broken, not the thing the user was
trying to do. A report that fails because the database is timing out goes to database even though the
user was in Excel.

## Priorities

- **P1**: a whole office, site, department or production service is down. Many people cannot work.
  Page the on-call engineer; target response 15 minutes.
- **P2**: a single user is completely blocked and cannot work. Target response one hour.
- **P3**: something is degraded or annoying, but the user can keep working or has a workaround.
  Target response one business day.
- **P4**: a question, how-to, or a request for something new (access, equipment, a new list or
  schema). Nothing is broken. Target response three business days.

If the user follows up and the impact changes (for example, the rest of the floor is now affected, or
a restart has given them a workaround), re-triage the ticket and change the priority. If the follow-up
shows the problem is really in another area, move it to the right team and keep the priority.
""",
    "vpn_runbook.md": """# Runbook: VPN disconnects and slow connections

**Owner:** network team. **Applies to:** GlobalProtect client on Windows and macOS laptops.

## Symptoms

Users report that the VPN drops every few minutes, that they have to reconnect repeatedly, or that
internal sites and network drives are slow or time out while connected from home.

## First checks (service desk)

1. Ask whether the user is the only one affected. If several people at the same site report it at
   once, raise a P1 and check the gateway status page before anything else.
2. Confirm the client version under Help, About. Anything older than 6.1 must be upgraded through the
   Software Center first.
3. Ask the user to run the built-in connection test and attach the result to the ticket.
4. Check whether the user is on hotel or mobile hotspot Wi-Fi. Captive portals and carrier NAT cause
   most single-user disconnects.

## Diagnosis (network team)

Look at the client log for repeated DPD timeouts. These mean the gateway stopped receiving keepalives,
usually because of packet loss on the home connection. Repeated MTU probe failures point to a router
that drops fragmented packets; setting the tunnel MTU to 1280 in the client profile fixes this in
almost every case.

If the log shows clean handshakes but the tunnel still drops, check the gateway for license exhaustion
or a certificate that is about to expire. Both affect every user and are handled as P1.

## Fix and follow-up

Apply the MTU profile, ask the user to reconnect and keep the ticket open for one working day. If the
problem is gone, resolve the ticket with the root cause in the resolution notes. Do not ask users to
uninstall the client themselves; it removes the machine certificate and locks them out until the
device is re-enrolled.
""",
    "password_and_mfa_faq.md": """# Passwords, lockouts and MFA: frequently asked questions

**I'm locked out after too many attempts. What now?**
Accounts unlock automatically after 30 minutes. If you can't wait, call the service desk; the identity
team can unlock you after verifying your identity with your manager or your employee number.

**How often do I have to change my password?**
Every 180 days. You get reminder emails from 14 days before it expires. Change it at
password.globex.example or by pressing Ctrl+Alt+Del on a Windows laptop in the office or on the VPN.

**What makes a valid password?**
At least 14 characters, not containing your name or username, and not one of your last ten passwords.
Long passphrases of four or five unrelated words are easier to remember and stronger than short complex
passwords.

**My MFA push notifications don't arrive.**
Open the authenticator app first; pending requests often appear there even when the notification
doesn't. Check that the phone's clock is set automatically. If you changed phones, the old
registration has to be removed before the new one works; raise a ticket for the identity team.

**Can I register a second MFA device?**
Yes. Go to the security page in your Okta profile, choose Add factor, and scan the QR code. We
recommend a second device or a hardware key so you are never locked out by a lost phone.

**A new starter needs an account.**
Managers should raise a new starter request at least five working days before the start date, stating
the department, the manager and the access groups needed. Laptops are requested separately from the
hardware team.

**Someone is leaving. Who removes their access?**
Their manager raises a leaver request. The identity team disables the account at the end of the last
working day, and the email team can forward their mail to the manager for 30 days on request.
""",
}


# ====================================================================================== README


# The field rows of the README's acme-shop table (each ends its line).
ACME_FIELDS = (
    "| `intent` | `refund`, `return`, `exchange`, `track`, `cancel`, `change_address` | the request wording: refund "
    "/ money back / charged twice -> refund; return / send back / return label -> return; swap / exchange / "
    "replacement / different size or colour -> exchange; where is / tracking / status / dispatched -> track; cancel "
    "/ void -> cancel; new / wrong / change of address, redirect -> change_address |\n"
    "| `order` | a 5-digit string | the only 5-digit number in the email (`order #48213`, `order no. 48213`, "
    "`#48213`, ...) |\n"
    "| `category` | `kitchen`, `bedding`, `bath`, `lighting`, `furniture`, `decor` | the product named (10 fixed "
    "products per category, e.g. cast-iron skillet -> kitchen, brass floor lamp -> lighting) |\n"
    "| `urgent` | `true` / `false` | true only with an explicit urgency phrase (urgent, ASAP, as soon as possible, "
    'right away, immediately, today, time-sensitive, "URGENT:" subject); "no rush" phrases appear only on false '
    "rows |\n"
)
# The field rows of the README's globex-it table (each ends its line).
GLOBEX_FIELDS = (
    "| `team` | `network`, `identity`, `hardware`, `email`, `database` | ticket vocabulary: VPN / Wi-Fi / DNS / "
    "port / switch / firewall -> network; password / locked out / MFA / SSO / Okta / access group / account -> "
    "identity; laptop / dock / monitor / printer / keyboard / headset -> hardware; Outlook / mailbox / shared "
    "mailbox / distribution list / calendar invites / bounce / phishing -> email; database / SQL / Postgres / query "
    "/ replication / backup / ETL -> database |\n"
    "| `priority` | `P1`, `P2`, `P3`, `P4` | impact sentence: whole office / site / department / floor affected -> "
    "P1; one user completely blocked, can't work -> P2; annoying, workaround, now and then, slows me down -> P3; a "
    "question or request (how do I, could I get, please create), nothing broken -> P4 |\n"
)


def readme(acme: Builder, globex: Builder, acme_stats: dict, globex_stats: dict) -> str:
    def sorted_json(label_counts: dict) -> str:
        return json.dumps(label_counts, sort_keys=True)

    def defects(b: Builder) -> str:
        out = ["| file | row | expected | field | defect |", "|---|---|---|---|---|"]
        for r in sorted(b.rejects, key=lambda r: (r["file"], r["row"] or 0)):
            out.append(
                f"| `{r['file']}` | {r['row'] if r['row'] is not None else '(file)'} | `{r['reason']}` "
                f"| {r['field'] or ''} | {r['defect']} |"
            )
        for d in b.duplicates:
            out.append(
                f"| `{d['file']}` | {d['row']} | duplicate of row {d['duplicate_of']['row']} | | {d['defect']} |"
            )
        return "\n".join(out)

    def counts(b: Builder) -> str:
        out = ["| file | rows in file | valid rows |", "|---|---|---|"]
        for f in sorted(b.files):
            if f in b.documents:
                out.append(f"| `{f}` | document | 1 document |")
            elif f in b.rows_in:
                out.append(f"| `{f}` | {b.rows_in[f]} | {b.valid[f]} |")
            else:
                out.append(f"| `{f}` | unreadable | 0 |")
        m = b.manifest()
        out.append(f"| **total** | {m['rows_in']} | **{m['valid_rows']}** (+{len(b.documents)} documents) |")
        return "\n".join(out)

    return f"""# Sample raw data

Synthetic, project-written sample inputs for the two tenants in `params.yaml`. **Do not edit by hand**:
everything here (this README included) is written by `python tools/make_sample_data.py`, which is
seeded and rewrites the folder byte-identically; `--check` verifies the committed files. The same
facts in machine-readable form are in `tools/sample_data_manifest.json`.

Row numbers below are 1-based as the readers count them: the line of a JSONL file, the element of a
JSON array, the data record (header excluded) of a CSV, the row of a Parquet file. Duplicates are
always the later row; "whitespace-only different" means equal after stripping and collapsing runs of
whitespace in each message.

## acme-shop: customer emails to order-system JSON

An online home-goods shop's support inbox. Each row is one customer email; the answer is exactly one
JSON object with a fixed key order:

```
{{"intent": "refund", "order": "48213", "category": "furniture", "urgent": false}}
```

| field | values | cue |
|---|---|---|
{ACME_FIELDS}
The question arrives in three shapes: alpaca (`instruction` / `input` / `output`, the instruction is
one of a few variants of "Extract the order request as JSON."), prompt/completion CSV (the prompt is
the instruction, a blank line and the email), and OpenAI chat (`messages` with a system prompt, the
email as the user turn and the JSON as the assistant turn). Three plain documents describe the shop's
policies.

Label counts over valid rows: intent {sorted_json(acme_stats["intent"])};
category {sorted_json(acme_stats["category"])}; urgent {sorted_json(acme_stats["urgent"])}.

{counts(acme)}

Intentional defects:

{defects(acme)}

## globex-it: helpdesk tickets to a routing decision

An IT service desk's tickets. The answer is a compact JSON routing decision:

```
{{"team": "network", "priority": "P2"}}
```

| field | values | cue |
|---|---|---|
{GLOBEX_FIELDS}
Shapes: sharegpt in Parquet (`id`, `conversations` of `from` system/human/gpt and `value`; 70% of rows
carry a system turn), and OpenAI `messages` in JSONL (80% with a system turn; about a third are
multi-turn: after the first answer the user follows up, saying the impact changed (re-prioritise) or
that the problem is really elsewhere (re-route, same priority), and the assistant answers again).
Three plain documents: the priority/routing reference, a VPN runbook and a password/MFA FAQ.

Label counts over all assistant answers in valid rows: team {sorted_json(globex_stats["team"])};
priority {sorted_json(globex_stats["priority"])}.

{counts(globex)}

Intentional defects:

{defects(globex)}
"""


def generate(acme_q2_rows: int = ACME_Q2_ROWS) -> dict[Path, bytes]:
    acme, acme_stats = build_acme(acme_q2_rows)
    globex, globex_stats = build_globex()
    out: dict[Path, bytes] = {}
    for b in (acme, globex):
        for name, data in b.files.items():
            out[RAW / b.tenant / name] = data
    out[RAW / "README.md"] = readme(acme, globex, acme_stats, globex_stats).encode("utf-8")
    manifest = {
        "generator": "tools/make_sample_data.py",
        "row_numbering": "1-based: JSONL line, JSON array element, CSV data record (header excluded), Parquet row",
        "duplicate_rule": "the later row is the duplicate; whitespace-only differences are duplicates",
        "counting": "rows_in = rows of readable structured files + 1 per unreadable file (its single reject); "
        "rows_in == valid_rows + rejected + duplicates; documents (.md/.txt) are counted separately",
        "tenants": {
            "acme-shop": {
                **acme.manifest(),
                "label_counts": acme_stats,
                "answer_keys": ["intent", "order", "category", "urgent"],
            },
            "globex-it": {**globex.manifest(), "label_counts": globex_stats, "answer_keys": ["team", "priority"]},
        },
    }
    out[MANIFEST] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group()  # --check compares data/raw; --out never touches it
    where.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any difference")
    ap.add_argument(
        "--acme-q2-rows",
        type=int,
        default=ACME_Q2_ROWS,
        help="emails in acme-shop's second-quarter export (the data-size study in docs/benchmarks.md; "
        "only the default gives the committed files)",
    )
    where.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the raw folders here instead of data/raw (the manifest is not written)",
    )
    args = ap.parse_args(argv)
    if args.acme_q2_rows != ACME_Q2_ROWS and args.out is None:
        # data/raw and the manifest hold the committed files: another size would overwrite them
        # (or, with --check, report every acme file as differing).
        ap.error(f"--acme-q2-rows {args.acme_q2_rows} is not the committed data ({ACME_Q2_ROWS}): give --out DIR")
    files = generate(args.acme_q2_rows)
    if args.out is not None:
        files = {args.out / p.relative_to(RAW): data for p, data in files.items() if RAW in p.parents}
        for p, data in sorted(files.items()):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        print(f"wrote {len(files)} files under {args.out}")
        return 0
    tenant_dirs = sorted({p.parent for p in files if p.parent.parent == RAW})
    if args.check:
        bad = [str(p.relative_to(ROOT)) for p, data in files.items() if not p.exists() or p.read_bytes() != data]
        for d in tenant_dirs:
            bad += [
                str(p.relative_to(ROOT)) + " (unexpected)"
                for p in sorted(d.rglob("*"))
                if p.is_file() and p not in files
            ]
        for line in bad:
            print("differs:", line, file=sys.stderr)
        return 1 if bad else 0
    for d in tenant_dirs:
        if d.exists():
            shutil.rmtree(d)
    for p, data in sorted(files.items()):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    total = sum(len(v) for p, v in files.items() if RAW in p.parents)
    print(f"wrote {len(files)} files, data/raw = {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
