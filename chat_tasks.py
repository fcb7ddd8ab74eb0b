"""Small chat tasks with one exact answer each: the embedded offline data of SFT and DPO.

`generate()` makes the same conversations on every machine (a fixed seed, no network). Each ends with a
user question whose answer is one short string (1-5 tokens), and carries a plausible wrong answer for
DPO's rejected response. The tasks are meant for a tiny Llama 3 that knows almost nothing: about half
are copy-like, which a few minutes of SFT on a CPU can teach it, the rest somewhat harder.

Copy-like:
  repeat        "Repeat these words: cat river"                   -> "cat river"
  uppercase     "Write in capital letters: green"                 -> "GREEN"
  first_word    "What is the first word of: lamp fox sun?"        -> "lamp"
  last_word     "What is the last word of: lamp fox sun?"         -> "sun"
  next_number   "What number comes after 41?"                     -> "42"
  passage       "Anna lives in Paris. Where does Anna live?"      -> "Paris"  (four templates; the
                answer is a word copied from the passage)
Harder:
  addition      "What is 23 + 45?"                                -> "68"     (two-digit numbers)
  reverse       "Reverse the order of these words: red box sun"   -> "sun box red"   (2-3 words)
  sort          "Sort these words alphabetically: pear fig apple" -> "apple fig pear" (2-3 words)
  units         "How many m are in 3 km?"                         -> "3000"   (km/m, m/cm, kg/g, h/min, min/s)

Wrong answers are near misses: an off-by-one or off-by-a-factor number, another word of the passage or
list, the words in the given (unreversed, unsorted) order, a letter swapped or the case not changed.

About a fifth of the conversations are two exchanges (an answered task, then the final question) and
about a quarter start with a system turn. No final question appears twice, nor as the earlier exchange
of any conversation, so a held-out split by a hash of the prompt shares no question, in any turn, with
training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

SEED = 20240521
NUM_CONVERSATIONS = 6400
MULTI_TURN_SHARE = 0.2
SYSTEM_SHARE = 0.25
SYSTEM_PROMPTS = ("Answer with the answer only.", "You are a helpful assistant. Reply briefly.",
                  "Give the exact answer and nothing else.")

# Common words that are one token each (checked in the tests), so answers stay short.
WORDS = ("apple", "bird", "blue", "boat", "book", "box", "bread", "car", "cat", "chair", "city", "cloud", "cold",
         "cup", "day", "desk", "dog", "door", "egg", "face", "farm", "fire", "fish", "flag", "food", "fox", "game",
         "gift", "gold", "green", "hand", "hat", "hill", "home", "horse", "house", "ice", "king", "lake", "lamp",
         "leaf", "light", "lion", "map", "moon", "music", "nest", "night", "paper", "park", "pen",
         "pig", "plant", "rain", "red", "ring", "river", "road", "rock", "rose", "salt", "sand", "sea", "ship",
         "sky", "snow", "song", "star", "stone", "sun", "table", "tea", "tree", "wall", "water",
         "wind", "wolf", "wood")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Maria", "Nick", "Olga", "Paul", "Rosa", "Sam", "Tom", "Vera")
CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Oslo", "Lima", "Dublin", "Vienna",
          "Prague")
COLORS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink")
THINGS = ("ball", "car", "hat", "bag", "cup", "kite", "boat", "book", "box", "lamp")
ANIMALS = ("cat", "dog", "horse", "bird", "fish", "fox", "wolf", "lion", "pig", "duck")
FOODS = ("bread", "rice", "soup", "fish", "cake", "apples", "eggs", "pasta", "cheese", "beans")
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60))


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    wrong: str  # a plausible wrong answer, never equal to `answer`


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _misspelled(rng: random.Random, word: str) -> str:
    """Two neighbouring letters swapped (a word with no such pair: a letter doubled)."""
    spots = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    if not spots:
        return word + word[-1]
    i = rng.choice(spots)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def repeat(rng: random.Random) -> Task:
    words = _words(rng, 1, 2)
    wrong = words[:-1] + [_misspelled(rng, words[-1])]
    return Task(f"Repeat these words: {' '.join(words)}", " ".join(words), " ".join(wrong))


def uppercase(rng: random.Random) -> Task:
    words = _words(rng, 1, 2)
    answer = " ".join(words).upper()
    wrong = " ".join(words) if rng.random() < 0.5 else " ".join(w.capitalize() for w in words)
    return Task(f"Write in capital letters: {' '.join(words)}", answer, wrong)


def first_word(rng: random.Random) -> Task:
    words = _words(rng, 2, 3)
    return Task(f"What is the first word of: {' '.join(words)}?", words[0], rng.choice(words[1:]))


def last_word(rng: random.Random) -> Task:
    words = _words(rng, 2, 3)
    return Task(f"What is the last word of: {' '.join(words)}?", words[-1], rng.choice(words[:-1]))


def next_number(rng: random.Random) -> Task:
    n = rng.randint(0, 998)
    return Task(f"What number comes after {n}?", str(n + 1), str(rng.choice([n, n + 2])))


def passage(rng: random.Random) -> Task:
    """A one-sentence passage and a question whose answer is a word of it; the wrong answer is another."""
    name = rng.choice(NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        color, thing = rng.choice(COLORS), rng.choice(THINGS)
        return Task(f"{name} has a {color} {thing}. What color is the {thing}?", color, rng.choice([thing, name]))
    if kind == 1:
        city = rng.choice(CITIES)
        return Task(f"{name} lives in {city}. Where does {name} live?", city, name)
    if kind == 2:
        animal = rng.choice(ANIMALS)
        return Task(f"The {animal} is called {name}. What is the {animal} called?", name, animal)
    food = rng.choice(FOODS)
    return Task(f"{name} likes to eat {food}. What does {name} like to eat?", food, name)


def addition(rng: random.Random) -> Task:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Task(f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-10, -1, 1, 10])))


def reverse(rng: random.Random) -> Task:
    words = _words(rng, 2, 3)
    return Task(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), " ".join(words))


def sort_words(rng: random.Random) -> Task:
    words = _words(rng, 2, 3)
    answer = sorted(words)
    wrong = words if words != answer else answer[::-1]
    return Task(f"Sort these words alphabetically: {' '.join(words)}", " ".join(answer), " ".join(wrong))


def units(rng: random.Random) -> Task:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 99)
    wrong_factor = {1000: 100, 100: 10, 60: 100}[factor]
    return Task(f"How many {small} are in {n} {big}?", str(n * factor), str(n * wrong_factor))


# (task, weight): the copy-like half first
TASKS: tuple[tuple[Callable[[random.Random], Task], float], ...] = (
    (repeat, 1.0), (uppercase, 1.0), (first_word, 1.0), (last_word, 1.0), (next_number, 1.0), (passage, 1.5),
    (addition, 1.5), (reverse, 1.0), (sort_words, 1.0), (units, 1.0))


@dataclass(frozen=True)
class Example:
    """One conversation: `prompt` (system and earlier turns included, ending with the user's question),
    the exact `answer`, and a `wrong` one."""

    prompt: tuple[dict, ...]
    answer: str
    wrong: str
    task: str


def _task(rng: random.Random) -> tuple[str, Task]:
    make = rng.choices([t for t, _ in TASKS], weights=[w for _, w in TASKS])[0]
    return make.__name__, make(rng)


def _earlier_exchange(rng: random.Random, finals: set[str]) -> Task:
    """A task for a conversation's first exchange whose question is nobody's final question."""
    while True:
        _, task = _task(rng)
        if task.question not in finals:
            return task


def generate(num: int = NUM_CONVERSATIONS, seed: int = SEED) -> list[Example]:
    """`num` conversations, the same on every run. No final question appears twice or as another
    conversation's earlier exchange, so whichever split holds a final question, no other conversation
    shows it answered."""
    rng = random.Random(seed)
    finals: set[str] = set()  # final questions so far: none repeats, none appears as an earlier exchange
    earlier_questions: set[str] = set()
    examples: list[Example] = []
    while len(examples) < num:
        name, task = _task(rng)
        turns: list[dict] = []
        if rng.random() < SYSTEM_SHARE:
            turns.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        earlier = _earlier_exchange(rng, finals) if rng.random() < MULTI_TURN_SHARE else None
        repeated = task.question in finals or task.question in earlier_questions
        if repeated or (earlier and earlier.question == task.question):
            continue
        if earlier:
            earlier_questions.add(earlier.question)
            turns += [{"role": "user", "content": earlier.question}, {"role": "assistant", "content": earlier.answer}]
        finals.add(task.question)
        turns.append({"role": "user", "content": task.question})
        examples.append(Example(tuple(turns), task.answer, task.wrong, name))
    return examples


def chat_rows(examples: list[Example]) -> Iterator[dict]:
    """SFT rows: `{"messages": [..., {"role": "assistant", "content": answer}]}`."""
    for e in examples:
        yield {"messages": [*e.prompt, {"role": "assistant", "content": e.answer}]}


def preference_rows(examples: list[Example]) -> Iterator[dict]:
    """DPO rows in the message-list shape: the right answer chosen, the near miss rejected."""
    for e in examples:
        yield {"chosen": [*e.prompt, {"role": "assistant", "content": e.answer}],
               "rejected": [*e.prompt, {"role": "assistant", "content": e.wrong}]}
