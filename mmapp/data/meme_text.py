"""A compositional generator of meme captions in three registers: sincere (positive), ironic
(sarcastic) and grim jokes (dark humor).

The first synthetic set had a 100-phrase vocabulary of plainly upbeat or plainly grim phrases; real
sarcasm is ironic praise of something unpleasant ("I JUST LOVE DOING MY TAXES"), and real dark humour
is a joke about death or failure, often with a cheerful set-up. Here a caption is a *form* (a
top/bottom template in one register) filled with a *topic* (pleasant things, unpleasant everyday
things, achievements, failures, death-related nouns). Forms and topics are each split once
(fixed seed, 70/15/15) into disjoint train/val/test parts, so test captions share neither a form nor
a topic with training captions.

Pure data code: no model, no I/O.
"""
from __future__ import annotations

import random
from functools import lru_cache

REGISTERS = ("sincere", "ironic", "grim_joke")  # -> positive, sarcastic, dark humor
SPLITS = ("train", "val", "test")
_SHARES = (0.7, 0.15, 0.15)

# ---- topics ---------------------------------------------------------------------------------------
# {P} pleasant things (noun phrases)
PLEASANT = """
fresh coffee|a sunny weekend|my dog|pizza night|a day at the beach|homemade cookies|summer holidays|my garden
|a new puppy|fresh bread from the oven|a road trip with friends|friday afternoon|a good book|movie night
|visiting my grandparents|a warm fire|fresh snow|a long nap|payday|a surprise party|my birthday cake
|a walk in the park|the sunset|ice cream|my cat|the first day of spring|dinner with family|a live concert
|graduation day|a quiet morning|breakfast in bed|a picnic by the river|hot chocolate|the farmers market
|my little sister|a clean kitchen|board game night|camping under the stars|a swim in the lake|fresh flowers
|my morning run|a cozy blanket|pancakes|the weekend|our wedding day|my new bike|the holidays|fresh strawberries
|a phone call from mom|a hug from my kids|a day off|my favourite band|the first coffee of the day|puppies
|the mountains|my best friend|a bubble bath|grandma's soup|the garden tomatoes|a new haircut|the school play
""".split("|")
# {U} unpleasant everyday things (noun / gerund phrases)
UNPLEASANT = """
doing the dishes|cleaning the bathroom|folding laundry|monday mornings|traffic jams
|waiting in line|the dentist|filling in forms
|group projects|homework|final exams|the alarm clock|assembling flat pack furniture|the morning commute
|printer errors|software updates|spam emails|paying bills|rent day|grocery shopping on a saturday
|stepping on lego|cold coffee|rain on my day off|slow wifi|unpaid overtime|the gym at six am|ironing shirts
|vacuuming the stairs|scrubbing the oven|reply all emails|jury duty|a six hour layover|delayed trains
|cancelled flights|a flat tyre|parking tickets|mosquito bites|catching a cold on vacation|spreadsheets
|password resets|the smoke alarm beeping at three am|a crying baby on the plane|losing my keys
|cleaning the gutters|a broken dishwasher|the tax office|customer service chatbots
|mowing the lawn in the heat|shovelling snow|defrosting the freezer|budget meetings|performance reviews
|the neighbour's leaf blower|burnt toast|a dead phone battery|the queue at the post office|roadworks
""".split("|")
# {A} achievements, as "when you ..." continuations
ACHIEVE = """
finally pass your driving test|finish your first marathon|fix the sink yourself
|bake the perfect cake|see your team win the final|finish the project a day early|learn to ride a bike
|hear your baby laugh for the first time|get the keys to your first home|graduate with honours
|finally finish the puzzle|catch your first fish|get a letter from an old friend|plant a tree with your kids
|win the pub quiz|make it to the summit|finally pay off the loan|hit a new personal best|adopt a shelter dog
|get a standing ovation|finish knitting your first scarf|see the northern lights|reach your savings goal
""".split("|")
# {F} failures / disasters (noun phrases)
FAILURE = """
my career|my diet|my savings|my startup|my exam results|my marriage|my sourdough starter|my retirement plan
|my last relationship|my credit score|my group project|my new year resolutions|my pension
|my fantasy football team|my goldfish|my business plan|my thesis|my car|my cooking
""".split("|")
# {G} grave nouns
GRAVE = """
my funeral|my grave|my coffin|my last will|the grim reaper|my obituary|my tombstone|the afterlife|my ashes
|the cemetery|my autopsy|the morgue|my deathbed|the hospice|my wake
""".split("|")

# ---- forms ----------------------------------------------------------------------------------------
# "top|bottom"; slots: {P} {U} {A} {F} {G}
SINCERE_FORMS = """
nothing beats|{P}|{P}|makes everything better|when you {A}|best feeling ever|grateful for|{P}
|{P}|this is what happiness looks like|me enjoying {P}|life is good|{P} with the people i love|my heart is full
|so happy right now|{P}|can't stop smiling|{P} made my day|life is good when you have|{P}
|today's mood|{P}|when you {A}|so proud of myself|highly recommend|{P}|small joys|{P}
|this is my happy place|{P}|you deserve|{P}|thank you for|{P} i love it|when you {A}|and everyone cheers for you
|best part of my week|{P}|sending good vibes|and {P}|simple pleasures|{P}|{P}|pure joy
|nothing makes me happier than|{P}|me when i see|{P}|{P}|yes please|who else loves|{P}
|when you {A}|dreams really do come true|a perfect day|{P}|{P} and sunshine|what more could you want
|feeling blessed|{P}|when you {A}|today was a good day|{P}|always worth it|finally done with {U}|now for {P}
|{U} is done|time for {P}|survived {U}|treating myself to {P}|even {U} can't ruin|{P}
|look what we made|{P}, from scratch|my kids surprised me with|{P}|big news|we finally got {P}
|when you {A}|and grandma is so proud|{P} with my favourite people|life doesn't get better
|first {P} of the year|absolutely wonderful
|can we talk about|how good {P} is|{P}|ten out of ten, would recommend|throwback to|{P}, best memories
|nothing fancy|just {P} and good company|when you {A}|you earned this|so thankful for|{P}
|{P}|everything i needed today
""".split("|")
IRONIC_FORMS = """
i just love|{U}|oh great|{U} again|yay|{U}|nothing says fun like|{U}|{U}|my favourite hobby
|wow|{U}, what a treat|can't wait for|{U}|my idea of a perfect weekend|{U}|{U}|best day ever, obviously
|living the dream|{U}|thanks|{U}, very cool|sure, i'd love more|{U}|i love {U}|said no one ever
|{U}|the highlight of my whole month|so glad i spent my saturday on|{U}|nothing i'd rather do than|{U}
|what could be better than|{U}|another day of {U}|i'm thrilled|ah yes|{U}, my one true passion
|oh joy|{U}|absolutely thrilled about|{U}|clearly i was born for|{U}|{U}|wow, lucky me
|fantastic|{U}, just what i needed|me pretending to enjoy|{U}|thank you so much for|{U}, really
|great idea|let's add more {U}|this is fine|{U} is totally fine|nothing like {U}|to start the day right
|my life is so exciting|{U}|{U}|ten out of ten, would do again|because i had nothing better to do|{U}
|everyone's favourite part of the week|{U}|shout out to|{U} for ruining my day so nicely
|i was hoping for|{U}, and my wish came true|{U} again?|you really shouldn't have
|my boss said|{U} builds character, how lovely|oh look|{U}, my absolute favourite|just what i always wanted|{U}
|who needs a weekend|when you have {U}|i'm so lucky|i get to enjoy {U} every day|the best part of adulthood|{U}
|they said it would be fun|{U}, such fun|me, a genius|spending my holiday on {U}|my dream vacation|{U} all week
|totally worth it|{U}|congratulations to me|i won {U} again|so relaxing|{U} at midnight
|wow, thanks for|{U}, i'm honoured|perfect timing|{U} right before the weekend
""".split("|")
GRIM_JOKE_FORMS = """
me at {G}|finally, no more {U}|when you die|you never have to face {U} again
|the doctor gave me six months to live|so i stopped worrying about {U}|{F}|dead, like everything else i touch
|at least in {G}|there's no {U}|my last words will be|"i should have skipped {U}"|{U}|killed me, bury me with {P}
|the grim reaper came for me|but left when he saw {U}|{F}|rest in peace, you never stood a chance
|my will to live|died somewhere between {U} and {F}|tell my family|{U} finally killed me
|when they read {G}|"he died doing {U}"|{F} crashed and burned|and so will i|{P} is nice|but have you tried dying
|i'd like {P} at {G}|and a coffin that fits|{F} is dead|and i'm next in line|put it on {G}|"{F} killed him"
|when grandma dies|and leaves you {U}|dig {G} now|{F} just failed again|see you in hell|bring {P}
|{F}|one more funeral this year|planning {G}|more fun than {U}|{F} died today|nobody came to the funeral
|my bucket list|outlived me|they said i'd die laughing|{F} made sure of it|when the plane starts shaking
|at least i skip {U}|{G}|the only thing i'll finish this year|the coroner said|{F} was the cause of death
|my uncle always said|he wanted to go peacefully, unlike {F}|my doctor said i have a week to live|so i skipped {U}
|they found my body|next to {F}|mom said i'd be the death of her|she was right, {G} is booked
|{F} died|i'm wearing black to the office
|when you realise|{F} will outlive you
|i'm not saying i want to die|but {U} is making a strong case
|{U} again|just put me in {G}|the last thing i saw|was {U}, then darkness|rip|{F}, you died as you lived
""".split("|")


def _pairs(flat: list[str]) -> tuple[tuple[str, str], ...]:
    items = [s.strip() for s in flat]
    items = [s for s in items]
    if len(items) % 2:
        raise ValueError("forms must come in top|bottom pairs")
    return tuple((items[i], items[i + 1]) for i in range(0, len(items), 2))


def _clean(pool: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.strip() for s in pool if s.strip()))


TOPICS = {"P": _clean(PLEASANT), "U": _clean(UNPLEASANT), "A": _clean(ACHIEVE), "F": _clean(FAILURE),
          "G": _clean(GRAVE)}
FORMS = {"sincere": _pairs(SINCERE_FORMS), "ironic": _pairs(IRONIC_FORMS), "grim_joke": _pairs(GRIM_JOKE_FORMS)}


def _split(pool: tuple, name: str, split: str) -> tuple:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    order = sorted(pool)
    random.Random(f"meme-text-split:{name}").shuffle(order)  # fixed: never reshuffled per seed
    n_train, n_val = round(_SHARES[0] * len(order)), round(_SHARES[1] * len(order))
    lo, hi = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}[split]
    return tuple(order[lo:hi])


@lru_cache(maxsize=None)
def topics(slot: str, split: str) -> tuple[str, ...]:
    return _split(TOPICS[slot], f"topic:{slot}", split)


@lru_cache(maxsize=None)
def forms(register: str, split: str) -> tuple[tuple[str, str], ...]:
    if register not in FORMS:
        raise ValueError(f"unknown register {register!r}; valid: {list(REGISTERS)}")
    return _split(FORMS[register], f"form:{register}", split)


def _fill(template: str, split: str, rng: random.Random, chosen: dict[str, str]) -> str:
    out = template
    for slot in TOPICS:
        key = "{" + slot + "}"
        while key in out:
            if slot not in chosen:
                chosen[slot] = rng.choice(topics(slot, split))
            out = out.replace(key, chosen[slot], 1)
    return out


def generate_caption(register: str, split: str, rng: random.Random) -> tuple[str, str]:
    """(top, bottom) of one caption in ``register``, from the forms and topics of ``split``; upper-case.

    A slot used twice in one form gets the same topic; one caption in ten puts all text at the top or
    the bottom (memes are not always two-line)."""
    top, bottom = rng.choice(forms(register, split))
    chosen: dict[str, str] = {}
    top, bottom = _fill(top, split, rng, chosen).upper(), _fill(bottom, split, rng, chosen).upper()
    layout = rng.random()
    if layout < 0.05:
        return f"{top} {bottom}", ""
    if layout < 0.1:
        return "", f"{top} {bottom}"
    return top, bottom
