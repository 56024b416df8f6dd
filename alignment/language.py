"""The persona world's language: a small regular grammar, its renderer and its deterministic parser.

Everything the persona world knows about text lives here. A *statement* asserts one slot value of a character
("i live in lyon ."); a *query* asks about one slot in one of several paraphrases ("where is your home ?");
a *response* is a sequence of clauses in a fixed order:

    [greeting] [empathy] BODY [closing]                  (greeting and closing: formal or casual, independently)
    BODY = content elaboration{0,3} [technical] [joke]     (each BODY clause prefixed "first ,", "second ," ...
                                                          when the response is structured)

The content clause either asserts a slot value (the same words as the statement, so a policy can learn to copy
the value from its system prompt) or is neutral chit-chat. Every clause ends in "." or, when enthusiastic, "!".
Words are separated by single spaces, punctuation included, so a word-level tokenizer covers the corpus.

`parse_response` recovers the clauses of any text, model samples included, and returns None for text that is
not a valid sentence of the grammar (shuffled words, unknown words, clauses out of order, two content clauses).
From the parse the world reads the asserted fact (for relevance and NLI labels) and the attribute vector that
every user's true reward is a function of (for preference labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- slots ------------------------------------------------------------------------------------------------
# Single-valued slots: (statement template, query paraphrases, values). The content clause that answers a slot
# uses the statement template, so answering = copying a value out of the persona.
SLOTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "name": ("my name is {} .", ("what is your name ?", "who are you ?", "what do people call you ?"),
             ("anna", "boris", "chloe", "dario", "elena", "farid", "greta", "hugo", "ines", "jonas", "kira", "liam",
              "maya", "nico", "olga", "pablo", "rosa", "sami", "tara", "viktor")),
    "home": ("i live in {} .", ("where do you live ?", "which city is your home ?", "where is your home ?"),
             ("lyon", "paris", "oslo", "rome", "cairo", "lima", "tokyo", "delhi", "berlin", "madrid", "dublin",
              "quito")),
    "job": ("i work as a {} .", ("what is your job ?", "what do you do for work ?", "how do you earn a living ?"),
            ("baker", "nurse", "pilot", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "chef",
             "judge", "tailor")),
    "pet": ("i have a pet {} .", ("do you have a pet ?", "what pet do you keep ?", "which animal lives with you ?"),
            ("dog", "cat", "parrot", "rabbit", "turtle", "horse", "goat", "snake", "hamster", "goldfish")),
    "hobby": ("my hobby is {} .", ("what is your hobby ?", "what do you do for fun ?",
                                   "how do you spend your free time ?"),
              ("chess", "hiking", "fishing", "knitting", "dancing", "cycling", "gardening", "swimming", "singing",
               "climbing")),
    "food": ("my favourite food is {} .", ("what is your favourite food ?", "what do you like to eat ?",
                                           "which dish do you love ?"),
             ("pasta", "rice", "soup", "bread", "cheese", "sushi", "curry", "tacos", "salad", "pie")),
    "drink": ("my favourite drink is {} .", ("what is your favourite drink ?", "what do you like to drink ?",
                                             "which drink do you enjoy ?"),
              ("tea", "coffee", "milk", "juice", "water", "cocoa", "soda", "lemonade")),
    "colour": ("my favourite colour is {} .", ("what is your favourite colour ?", "which colour do you like ?",
                                               "what colour makes you happy ?"),
               ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")),
    "music": ("i listen to {} music .", ("what music do you listen to ?", "which music do you enjoy ?",
                                         "what do you play on the radio ?"),
              ("jazz", "rock", "folk", "blues", "pop", "opera", "reggae", "techno")),
    "sport": ("i play {} .", ("what sport do you play ?", "which game do you play ?", "do you play a sport ?"),
              ("tennis", "soccer", "golf", "rugby", "hockey", "cricket", "volleyball", "basketball")),
    "siblings": ("i have {} siblings .", ("do you have siblings ?", "how big is your family ?",
                                          "how many siblings do you have ?"),
                 ("no", "one", "two", "three", "four", "five")),
    "age": ("i am {} years old .", ("how old are you ?", "what is your age ?", "when were you born ?"),
            ("twenty", "thirty", "forty", "fifty", "sixty", "seventy")),
    "temperament": ("i am a {} person .", ("what are you like ?", "how would you describe yourself ?",
                                           "what is your nature ?"),
                    ("calm", "cheerful", "shy", "stubborn", "curious", "patient", "grumpy", "brave")),
    "season": ("my favourite season is {} .", ("what is your favourite season ?", "which season do you love ?",
                                               "what time of year do you like ?"),
               ("spring", "summer", "autumn", "winter")),
    "transport": ("i travel by {} .", ("how do you travel ?", "how do you get around ?",
                                       "what do you ride to work ?"),
                  ("bus", "train", "bike", "car", "boat", "tram")),
    "language": ("i speak {} .", ("what language do you speak ?", "which language do you know ?",
                                  "what do you speak at home ?"),
                 ("french", "spanish", "german", "arabic", "hindi", "japanese", "italian", "swahili")),
    "fear": ("i am afraid of {} .", ("what are you afraid of ?", "what scares you ?", "what is your fear ?"),
             ("spiders", "heights", "storms", "darkness", "crowds", "ghosts")),
}

# Opinion slots, one per item: slot "opinion:<item>", value "like" or "dislike". These let a character carry up
# to 60 statements while every slot stays single-valued (so "contradicted" means: same slot, other value).
OPINION_ITEMS = (
    "rain", "snow", "mountains", "beaches", "museums", "markets", "parties", "mornings", "nights", "gardens",
    "forests", "deserts", "concerts", "libraries", "islands", "rivers", "bridges", "castles", "festivals", "villages",
    "trains", "poetry", "puzzles", "cards", "candles", "clocks", "maps", "kites", "stamps", "coins", "robots",
    "dragons", "pirates", "storms", "sunsets", "picnics", "theatres", "circuses", "zoos", "farms", "ships",
    "gadgets", "riddles", "lanterns",
)
# The item comes first so that answering is a prefix copy ("rain is something i" -> the next word in the persona),
# the same induction pattern as the single slots, rather than a look-back to the word before the item.
OPINION_TEMPLATE = {"like": "{} is something i like .", "dislike": "{} is something i dislike ."}
OPINION_QUERIES = ("do you like {} ?", "how do you feel about {} ?", "what do you think of {} ?")

# Off-topic queries: no persona statement is relevant; the right answer is neutral chit-chat.
OFF_TOPIC_QUERIES = (
    "what time is it ?", "can you help me with my homework ?", "what is the weather like today ?",
    "tell me something nice ?", "what should i cook tonight ?", "is it far to the sea ?",
)
NEUTRAL_CLAUSES = ("that is a good question", "let us talk about something else", "i am not sure about that",
                   "it is a nice day", "thank you for asking")

# --- style clauses ----------------------------------------------------------------------------------------------
GREETINGS = {1: "good day", -1: "hey"}  # formality +1 / -1
CLOSINGS = {1: "kind regards", -1: "cheers"}
EMPATHY = "i understand how you feel"
ELABORATIONS = ("i think about it a lot", "it means a great deal to me", "there is more to say about it")
TECHNICAL = "in technical terms the data supports this"
JOKE = "ha that reminds me of a funny joke"
ORDINALS = ("first ,", "second ,", "third ,", "fourth ,", "fifth ,", "sixth ,")

# Attributes that users weigh; order = index into every attribute vector.
ATTRIBUTES = ("length", "formality", "enthusiasm", "humour", "empathy", "technical", "structure")
K = len(ATTRIBUTES)


@dataclass(frozen=True)
class Style:
    """How a response is dressed: the knobs that realize the K attributes in text."""

    greeting: int = 0  # +1 formal ("good day"), -1 casual ("hey"), 0 none
    closing: int = 0  # +1 formal ("kind regards"), -1 casual ("cheers"), 0 none
    empathy: bool = False
    elaborations: int = 0  # 0..3, realizes length
    technical: bool = False
    joke: bool = False
    structure: bool = False
    exclaim: bool = False  # end every clause in "!" (enthusiasm)


@dataclass(frozen=True)
class Parse:
    """What the parser recovered from a valid response."""

    fact: tuple[str, str] | None  # (slot, value) asserted by the content clause, None for neutral content
    style: Style
    n_clauses: int


# --- rendering --------------------------------------------------------------------------------------------------
def statement_text(slot: str, value: str) -> str:
    """The persona statement (and content clause) asserting `slot = value`, e.g. 'i live in lyon .'."""
    if slot.startswith("opinion:"):
        return OPINION_TEMPLATE[value].format(slot.split(":", 1)[1])
    return SLOTS[slot][0].format(value)


def query_paraphrases(slot: str | None) -> tuple[str, ...]:
    """All paraphrases of the query about `slot` (None: the off-topic queries)."""
    if slot is None:
        return OFF_TOPIC_QUERIES
    if slot.startswith("opinion:"):
        return tuple(q.format(slot.split(":", 1)[1]) for q in OPINION_QUERIES)
    return SLOTS[slot][1]


def slot_values(slot: str) -> tuple[str, ...]:
    return ("like", "dislike") if slot.startswith("opinion:") else SLOTS[slot][2]


def all_slots() -> list[str]:
    return list(SLOTS) + [f"opinion:{item}" for item in OPINION_ITEMS]


def render_response(fact: tuple[str, str] | None, neutral: int, style: Style) -> str:
    """Render a response: `fact` = (slot, value) for the content clause, else NEUTRAL_CLAUSES[neutral]."""
    content = statement_text(*fact)[:-2] if fact else NEUTRAL_CLAUSES[neutral]
    body = [content, *ELABORATIONS[: style.elaborations]]
    body += [TECHNICAL] if style.technical else []
    body += [JOKE] if style.joke else []
    if style.structure:
        body = [f"{ORDINALS[i]} {clause}" for i, clause in enumerate(body)]
    clauses = [GREETINGS[style.greeting]] if style.greeting else []
    clauses += [EMPATHY] if style.empathy else []
    clauses += body
    clauses += [CLOSINGS[style.closing]] if style.closing else []
    end = "!" if style.exclaim else "."
    return " ".join(f"{c} {end}" for c in clauses)


# --- parsing ----------------------------------------------------------------------------------------------------
def _content_index() -> dict[str, tuple[str, str] | None]:
    """Every content clause (without its terminator) -> the fact it asserts (None for neutral chit-chat)."""
    index: dict[str, tuple[str, str] | None] = {c: None for c in NEUTRAL_CLAUSES}
    for slot in all_slots():
        for value in slot_values(slot):
            index[statement_text(slot, value)[:-2]] = (slot, value)
    return index


_CONTENT = _content_index()
_GREETING = {v: k for k, v in GREETINGS.items()}
_CLOSING = {v: k for k, v in CLOSINGS.items()}


def _split_clauses(text: str) -> list[tuple[str, str]] | None:
    """Split into (clause words, terminator); None if the text does not end in a terminator or has an empty clause."""
    clauses, words = [], []
    for word in text.split():
        if word in (".", "!"):
            if not words:
                return None
            clauses.append((" ".join(words), word))
            words = []
        else:
            words.append(word)
    return clauses if clauses and not words else None


def parse_response(text: str) -> Parse | None:
    """Parse a response into its content fact and style; None if it is not a valid world sentence.

    Validity: clauses in grammar order, one content clause, consistent terminators ("." everywhere or "!"
    everywhere), ordinals either on every body clause in sequence or on none. A greeting and a closing of different
    registers are allowed (their formality averages to 0): an earlier version rejected them, and they were most of
    the tiny policy's invalid samples (a dependency across the whole response), for no gain in what the world
    measures.
    """
    clauses = _split_clauses(text)
    if not clauses or len({end for _, end in clauses}) != 1:
        return None
    words = [c for c, _ in clauses]
    greeting = closing = 0
    if words[0] in _GREETING:
        greeting, words = _GREETING[words[0]], words[1:]
    if words and words[-1] in _CLOSING:
        closing, words = _CLOSING[words[-1]], words[:-1]
    empathy = bool(words) and words[0] == EMPATHY
    body = words[1:] if empathy else words
    structure = bool(body) and body[0].startswith(ORDINALS[0])
    if structure:
        if len(body) > len(ORDINALS) or any(not c.startswith(ORDINALS[i] + " ") for i, c in enumerate(body)):
            return None
        body = [c[len(ORDINALS[i]) + 1:] for i, c in enumerate(body)]
    if not body or body[0] not in _CONTENT:
        return None
    rest = body[1:]
    elaborations = 0
    while elaborations < len(rest) and elaborations < len(ELABORATIONS) and rest[elaborations] == ELABORATIONS[
            elaborations]:
        elaborations += 1
    rest = rest[elaborations:]
    technical = bool(rest) and rest[0] == TECHNICAL
    rest = rest[1:] if technical else rest
    joke = bool(rest) and rest[0] == JOKE
    rest = rest[1:] if joke else rest
    if rest:
        return None
    style = Style(greeting=greeting, closing=closing, empathy=empathy,
                  elaborations=elaborations, technical=technical, joke=joke, structure=structure,
                  exclaim=clauses[0][1] == "!")
    return Parse(fact=_CONTENT[body[0]], style=style, n_clauses=len(clauses))


def parse_statement(text: str) -> tuple[str, str]:
    """The (slot, value) a persona statement asserts ('i live in lyon .' -> ('home', 'lyon')); ValueError if the
    text is not a world statement."""
    fact = _CONTENT.get(text[:-2]) if text.endswith(" .") else None
    if fact is None:
        raise ValueError(f"not a world persona statement: {text!r}")
    return fact


_QUERY_SLOT = {q: slot for slot in [None, *all_slots()] for q in query_paraphrases(slot)}


def query_slot(text: str) -> str | None:
    """The slot a world query asks about (None for an off-topic one); ValueError if the text is not a world query."""
    if text not in _QUERY_SLOT:
        raise ValueError(f"not a world query: {text!r}")
    return _QUERY_SLOT[text]


def attribute_vector(style: Style) -> np.ndarray:
    """(K,) attribute values in [-1, 1] realized by a style, in the order of ATTRIBUTES."""
    formality = (style.greeting + style.closing) / 2
    return np.array([style.elaborations / len(ELABORATIONS), formality, float(style.exclaim), float(style.joke),
                     float(style.empathy), float(style.technical), float(style.structure)])


def profile(style: Style) -> str:
    """A coarse attribute profile: which attributes are present (with the sign of formality), e.g. 'L+-h...'."""
    a = attribute_vector(style)
    marks = "LFEHMTS"
    return "".join(m if v > 0 else ("f" if (m == "F" and v < 0) else ".") for m, v in zip(marks, a, strict=True))


# --- oracle labels ----------------------------------------------------------------------------------------------
NLI_LABELS = ("contradicted", "neutral", "entailed")
RELEVANCE_LABELS = ("no", "yes")


def nli_label(statement: tuple[str, str], fact: tuple[str, str] | None) -> str:
    """Entailed / neutral / contradicted of a response asserting `fact` with respect to `statement` (slot, value)."""
    if fact is None or fact[0] != statement[0]:
        return "neutral"
    return "entailed" if fact[1] == statement[1] else "contradicted"


def relevant(statement_slot: str, query_slot: str | None) -> bool:
    """A statement is relevant to a query iff the query asks about the statement's slot."""
    return query_slot is not None and statement_slot == query_slot


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (for the word-level tokenizer)."""
    texts = [statement_text(s, v) for s in all_slots() for v in slot_values(s)]
    texts += [q for s in [None, *all_slots()] for q in query_paraphrases(s)]
    texts += [*NEUTRAL_CLAUSES, *GREETINGS.values(), *CLOSINGS.values(), EMPATHY, *ELABORATIONS, TECHNICAL, JOKE,
              *ORDINALS, ". !"]
    return sorted({w for t in texts for w in t.split()})
