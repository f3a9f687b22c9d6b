"""Tasks for a small instruct model (SmolLM2-135M-Instruct), as seeded generators with train/eval splits.

New skills in the paper's spirit, each scored by one of ``sdft_ray.evaluate``'s scorers:

- ``tool_use``: choose the right tool from a small catalogue and fill in its arguments, answering with
  ``Action: <name>`` and ``Action Input: {json}`` lines (the paper's tool-use format; scorer ``tool_use``).
- ``answer_tag``: short unit-conversion questions with the final answer inside ``<answer>...</answer>``
  (the paper's science format; scorer ``answer_tag``).

Prior capabilities: ``probes`` are general questions with a short known answer (scorer ``contains``). An
experiment keeps only those the base model answers correctly, so any later miss is forgetting.

Records use the ``{"prompt", "golden_response": [...], "answer"}`` format, so the data layer builds the student
and teacher prompts as it would for a user's data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TOOLS = {
    "get_weather": ("Get the current weather for a city.", {"city": "city name"}),
    "convert_currency": (
        "Convert an amount of money between currencies.",
        {"amount": "number", "from": "currency code", "to": "currency code"},
    ),
    "set_timer": ("Start a countdown timer.", {"minutes": "number of minutes"}),
    "send_email": ("Send an email.", {"to": "recipient name", "subject": "subject line"}),
    "translate": ("Translate text into another language.", {"text": "text to translate", "language": "target"}),
}
# Tools no training prompt shows: ``tool_use_unseen_eval`` lists them (in their own catalogue) and asks for them,
# so a model that learned the format transfers it, while one that memorized the five training tools does not.
UNSEEN_TOOLS = {
    "book_table": ("Reserve a table at a restaurant.", {"restaurant": "restaurant name", "people": "number"}),
    "get_stock_price": ("Look up the latest price of a stock.", {"symbol": "ticker symbol"}),
    "play_music": ("Play a song.", {"song": "song title", "artist": "artist name"}),
    "create_event": ("Add an event to the calendar.", {"title": "event title", "day": "weekday"}),
}
_RESTAURANTS = ["Luigi's", "Sakura", "The Green Fork", "Casa Lola", "Blue Lotus"]
_SYMBOLS = ["AAPL", "MSFT", "TSLA", "AMZN", "NVDA", "IBM"]
_SONGS = [("Yesterday", "The Beatles"), ("Halo", "Beyonce"), ("Imagine", "John Lennon"), ("Hello", "Adele")]
_EVENTS = ["Dentist", "Team sync", "Yoga class", "Birthday party", "Book club"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Madrid", "Nairobi", "Toronto", "Sydney", "Berlin", "Rome"]
_CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD"]
_NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro"]
_SUBJECTS = ["Meeting notes", "Lunch plans", "Project update", "Invoice", "Weekend trip", "Quick question"]
_PHRASES = ["good morning", "thank you", "where is the station", "I like tea", "see you tomorrow"]
_LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese"]


def _tool_header(tools: dict[str, tuple[str, dict[str, str]]]) -> str:
    return (
        "You can call these tools:\n"
        + "\n".join(f"- {name}: {desc} Arguments: {json.dumps(args)}" for name, (desc, args) in tools.items())
        + "\nReply with one line 'Action: <tool name>' and one line 'Action Input: <JSON arguments>'.\n\nRequest: "
    )


_TOOL_HEADER = _tool_header(TOOLS)
_UNSEEN_HEADER = _tool_header(UNSEEN_TOOLS)


def _tool_example(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    tool = rng.choice(sorted(TOOLS))
    if tool == "get_weather":
        city = rng.choice(_CITIES)
        request = rng.choice(["What's the weather like in {c}?", "Is it raining in {c} right now?"])
        return tool, request.format(c=city), {"city": city}
    if tool == "convert_currency":
        a, f, t = rng.choice([5, 20, 50, 100, 250]), *rng.sample(_CURRENCIES, 2)
        return tool, f"How much is {a} {f} in {t}?", {"amount": a, "from": f, "to": t}
    if tool == "set_timer":
        m = rng.choice([3, 5, 10, 15, 25, 45])
        request = rng.choice(["Set a timer for {m} minutes.", "Remind me in {m} minutes."])
        return tool, request.format(m=m), {"minutes": m}
    if tool == "send_email":
        who, subject = rng.choice(_NAMES), rng.choice(_SUBJECTS)
        return tool, f"Email {who} with the subject '{subject}'.", {"to": who, "subject": subject}
    text, lang = rng.choice(_PHRASES), rng.choice(_LANGUAGES)
    return tool, f"Translate '{text}' into {lang}.", {"text": text, "language": lang}


def _unseen_tool_example(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    tool = rng.choice(sorted(UNSEEN_TOOLS))
    if tool == "book_table":
        place, n = rng.choice(_RESTAURANTS), rng.randint(2, 8)
        return tool, f"Book a table for {n} at {place}.", {"restaurant": place, "people": n}
    if tool == "get_stock_price":
        sym = rng.choice(_SYMBOLS)
        return (
            tool,
            rng.choice(["What is {s} trading at?", "Check the stock price of {s}."]).format(s=sym),
            {"symbol": sym},
        )
    if tool == "play_music":
        song, artist = rng.choice(_SONGS)
        return tool, f"Play {song} by {artist}.", {"song": song, "artist": artist}
    title, day = rng.choice(_EVENTS), rng.choice(_DAYS)
    return tool, f"Put '{title}' in my calendar on {day}.", {"title": title, "day": day}


def _tool_record(header: str, example: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    tool, request, args = example
    gold = f"Action: {tool}\nAction Input: {json.dumps(args)}"
    return {"prompt": header + request, "golden_response": [gold], "answer": gold}


def tool_use_record(rng: random.Random) -> dict[str, Any]:
    return _tool_record(_TOOL_HEADER, _tool_example(rng))


def unseen_tool_record(rng: random.Random) -> dict[str, Any]:
    return _tool_record(_UNSEEN_HEADER, _unseen_tool_example(rng))


_CONVERSIONS = [  # question, factor, one unit, target unit
    ("How many minutes are in {x} hours?", 60, "hour", "minutes"),
    ("How many seconds are in {x} minutes?", 60, "minute", "seconds"),
    ("How many days are in {x} weeks?", 7, "week", "days"),
    ("How many months are in {x} years?", 12, "year", "months"),
    ("How many centimeters are in {x} meters?", 100, "meter", "centimeters"),
    ("How many grams are in {x} kilograms?", 1000, "kilogram", "grams"),
    ("How many hours are in {x} days?", 24, "day", "hours"),
    ("How many millimeters are in {x} centimeters?", 10, "centimeter", "millimeters"),
    ("How many minutes are in {x} quarter hours?", 15, "quarter hour", "minutes"),
]


def answer_tag_record(rng: random.Random) -> dict[str, Any]:
    question, factor, unit, target = rng.choice(_CONVERSIONS)
    x = rng.randint(2, 30)
    gold = f"One {unit} is {factor} {target}, so {x} x {factor} = {x * factor}.\n<answer>{x * factor}</answer>"
    prompt = question.format(x=x) + " Put the final number inside <answer></answer>."
    return {"prompt": prompt, "golden_response": [gold], "answer": str(x * factor)}


PROBES = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color are bananas when ripe?", "yellow"),
    ("How many legs does a spider have?", "eight"),
    ("How many days are in a week?", "seven"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the opposite of hot?", "cold"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Which star is at the center of our solar system?", "Sun"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("How many continents are there?", "seven"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What instrument has 88 keys?", "piano"),
    ("What is the primary language spoken in Mexico?", "Spanish"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is the currency of Japan?", "yen"),
]

# held-out general prompts for drift: the NLL of the base model's own answers, measured under the trained model
DRIFT_PROMPTS = [
    "Give me a tip for sleeping better.",
    "Write one sentence about the ocean.",
    "What is a good name for a cat?",
    "Describe a sunny day in one sentence.",
    "Why do people drink coffee?",
    "Suggest a healthy breakfast.",
    "What is your favorite season and why?",
    "Explain what a library is.",
]


def make_tasks(out: str | Path, seed: int = 0, n_train: int = 192, n_eval: int = 64) -> dict[str, str]:
    """Write ``<task>_{train,eval}.jsonl`` for each new skill, ``tool_use_unseen_eval.jsonl`` (tools no training
    prompt shows) and ``probes_eval.jsonl``; returns the paths.

    Eval prompts never appear in train (the split is by distinct prompt text).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: dict[str, str] = {}
    for name, make in (("tool_use", tool_use_record), ("answer_tag", answer_tag_record)):
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(50 * (n_train + n_eval)):
            rec = make(rng)
            seen.setdefault(rec["prompt"], rec)
            if len(seen) >= n_train + n_eval:
                break
        recs = list(seen.values())
        rng.shuffle(recs)
        if len(recs) < n_eval + 1:
            raise ValueError(f"task {name}: only {len(recs)} distinct prompts; ask for fewer examples")
        for split, rows in (("eval", recs[:n_eval]), ("train", recs[n_eval:])):
            path = out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[f"{name}_{split}"] = str(path)
    # its own generator, drawn after the others: the existing files stay byte-identical for a given seed
    unseen: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n_eval):
        rec = unseen_tool_record(rng)
        unseen.setdefault(rec["prompt"], rec)
        if len(unseen) >= n_eval:
            break
    path = out / "tool_use_unseen_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unseen.values()))
    paths["tool_use_unseen_eval"] = str(path)
    probes = out / "probes_eval.jsonl"
    probes.write_text("".join(json.dumps({"prompt": q, "golden_response": [a], "answer": a}) + "\n" for q, a in PROBES))
    paths["probes_eval"] = str(probes)
    return paths
