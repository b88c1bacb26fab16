"""Synthetic data samples that mlxft generates itself, so that they may be bundled and redistributed.

    python data/make_samples.py          # (re)writes everything under data/ from DEFAULT_SEED

MIND, MovieLens and the Alpaca text may not be redistributed; these stand-ins have the same
formats and a signal that a tiny model can learn in minutes on a CPU:

- data/mind-sample/{behaviors,news}.tsv: MIND logs. Each user likes 1-2 of 8 topics and clicks
  news of those topics far more often (plus a per-news popularity). Titles are 4-8 words drawn
  from a 30-word vocabulary per topic, so matching the target title against the liked and
  disliked titles predicts the click. `mind_signal_report` measures that with plain baselines.
- data/alpaca-sample.json: deterministic template tasks (reverse, sort, capitals, arithmetic...).
- data/preference-sample.jsonl: chosen = correct, polite, ends with a period; rejected = wrong
  or rude.
- data/opposing-sample.json and data/opposing-test.json: opinion prompts with a supporting and
  an opposing answer, as in the DPO homework.
- data/products.csv: product rows whose description is a template over the other fields.

Everything is a pure function of the seed: each file draws from its own numpy PCG64 stream
(`default_rng([seed, stream])`), never from Python's hash() or set order, and files are written
as ASCII with "\\n" line ends, so the same seed gives byte-identical files on every machine.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from mlxft.data.sources.synthetic_mind import DEFAULT_SEED, _pick, make_mind
from mlxft.data.sources.synthetic_ratings import make_bookcrossing, make_movielens

SAMPLE_FILES = (
    "mind-sample/behaviors.tsv",
    "mind-sample/news.tsv",
    "alpaca-sample.json",
    "preference-sample.jsonl",
    "opposing-sample.json",
    "opposing-test.json",
    "products.csv",
    "arithmetic.jsonl",
    "movielens-sample/u.data",
    "movielens-sample/u.item",
    "bookcrossing-sample/BX-Book-Ratings.csv",
    "bookcrossing-sample/BX-Books.csv",
)
_STREAMS = {"alpaca": 2, "preference": 3, "opposing": 4, "products": 5, "arithmetic": 6}

# ---------------------------------------------------------------------------------------------
# Instruction rows (Alpaca), preference pairs, opposing answers, products

COUNTRIES = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Australia", "Canberra"),
)
ANTONYMS = tuple(tuple(p.split("/")) for p in (
    "hot/cold big/small fast/slow happy/sad up/down light/dark open/closed early/late loud/quiet "
    "full/empty hard/soft rich/poor wet/dry high/low strong/weak long/short thick/thin "
    "clean/dirty near/far young/old").split())
WORDS = ("apple river garden yellow window candle forest pencil rabbit silver ocean ladder "
         "button cloud tiger lemon bridge violin marble kettle meadow rocket basket pepper "
         "island lantern feather orange castle blanket").split()
_REVIEW = {
    "Positive": (("great", "sturdy", "comfortable", "lovely", "reliable", "delicious"),
                 ("I would buy it again.", "I recommend it.", "It made my day.")),
    "Negative": (("broken", "flimsy", "noisy", "awful", "useless", "stale"),
                 ("I want a refund.", "I would not buy it again.", "It was a waste of money.")),
}
_REVIEWED = ("blender", "jacket", "lamp", "phone case", "backpack", "coffee", "chair", "book")


def _words(rng, lo, hi):
    return [WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(lo, hi + 1)), replace=False)]


def _alpaca_with_input(rng) -> dict:
    task = int(rng.integers(8))
    if task == 0:
        w = _words(rng, 3, 6)
        return _row("Reverse the order of these words.", " ".join(w), " ".join(w[::-1]))
    if task == 1:
        n = [int(x) for x in rng.choice(100, size=int(rng.integers(3, 7)), replace=False)]
        return _row("Sort these numbers from smallest to largest.", ", ".join(map(str, n)),
                    ", ".join(map(str, sorted(n))))
    if task == 2:
        w = " ".join(_words(rng, 2, 5))
        return _row("Convert this text to uppercase.", w, w.upper())
    if task == 3:
        label = _pick(rng, ("Positive", "Negative"))
        adjectives, endings = _REVIEW[label]
        a, b = (adjectives[j] for j in rng.choice(len(adjectives), size=2, replace=False))
        review = f"The {_pick(rng, _REVIEWED)} was {a} and {b}. {_pick(rng, endings)}"
        return _row("Classify the sentiment of this review as Positive or Negative.", review, label)
    if task == 4:
        country, capital = _pick(rng, COUNTRIES)
        return _row("Give the capital of the country.", country, capital)
    if task == 5:
        a, b = (int(x) for x in rng.integers(1, 100, size=2))
        return _row("Add these two numbers.", f"{a} and {b}", str(a + b))
    if task == 6:
        w = _words(rng, 3, 9)
        return _row("Count the words in this text.", " ".join(w), str(len(w)))
    w = _words(rng, 2, 6)
    return _row("Give the first letter of each word.", " ".join(w), " ".join(x[0] for x in w))


def _alpaca_without_input(rng) -> dict:
    task = int(rng.integers(5))
    if task == 0:
        country, capital = _pick(rng, COUNTRIES)
        return _row(f"What is the capital of {country}?", "", f"The capital of {country} is {capital}.")
    if task == 1:
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        op, value = _pick(rng, (("plus", a + b), ("times", a * b), ("minus", a - b)))
        return _row(f"What is {a} {op} {b}?", "", f"{a} {op} {b} is {value}.")
    if task == 2:
        word, opposite = _pick(rng, ANTONYMS)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        return _row(f"What is the opposite of {word}?", "", f"The opposite of {word} is {opposite}.")
    if task == 3:
        a = int(rng.integers(1, 20))
        b = a + int(rng.integers(3, 9))
        return _row(f"Count from {a} to {b}.", "", ", ".join(str(x) for x in range(a, b + 1)))
    word = _pick(rng, WORDS)
    return _row(f"Spell the word {word} backwards.", "", word[::-1])


def _row(instruction, input_, output):
    return {"instruction": instruction, "input": input_, "output": output}


def make_alpaca(seed: int = DEFAULT_SEED, n: int = 400) -> list[dict]:
    """Alpaca rows {instruction, input, output}; a third have an empty input; no row repeats."""
    rng = np.random.default_rng([seed, _STREAMS["alpaca"]])
    with_input = rng.permutation(np.arange(n) >= n // 3)
    rows, seen = [], set()
    for has_input in with_input:
        while True:
            row = _alpaca_with_input(rng) if has_input else _alpaca_without_input(rng)
            key = (row["instruction"], row["input"])
            if key not in seen:
                break
        seen.add(key)
        rows.append(row)
    return rows


_POLITE = ("Sure, ", "Happy to help: ", "Of course! ", "Good question. ")
_RUDE = ("Obviously ", "Ugh, fine, ", "Everyone knows ", "Seriously? ")
_RUDE_ENDS = (", look it up yourself", ", stop asking", "", ", not that you care")


def _question(rng) -> tuple[str, str, str]:
    """(prompt, correct answer sentence without period, a wrong one)."""
    kind = int(rng.integers(3))
    if kind == 0:
        i, j = rng.choice(len(COUNTRIES), size=2, replace=False)
        (country, capital), wrong = COUNTRIES[i], COUNTRIES[j][1]
        return (f"What is the capital of {country}?", f"the capital of {country} is {capital}",
                f"the capital of {country} is {wrong}")
    if kind == 1:
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        wrong = a + b + _pick(rng, (-3, -2, -1, 1, 2, 5, 10))
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}", f"{a} plus {b} is {wrong}"
    word, opposite = _pick(rng, ANTONYMS)
    wrong = _pick(rng, [w for pair in ANTONYMS for w in pair if w not in (word, opposite)])
    return (f"What is the opposite of {word}?", f"the opposite of {word} is {opposite}",
            f"the opposite of {word} is {wrong}")


def make_preferences(seed: int = DEFAULT_SEED, n: int = 300) -> list[dict]:
    """{prompt, chosen, rejected}: chosen is correct, polite and ends with a period; rejected is
    wrong, rude (no period), or both."""
    rng = np.random.default_rng([seed, _STREAMS["preference"]])
    rows, seen = [], set()
    while len(rows) < n:
        prompt, right, wrong = _question(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        chosen = _pick(rng, _POLITE) + right + "."
        flaw = int(rng.integers(3))  # 0 wrong, 1 rude, 2 wrong and rude
        if flaw == 0:
            rejected = _pick(rng, _POLITE) + wrong + "."
        else:
            rejected = _pick(rng, _RUDE) + (wrong if flaw == 2 else right) + _pick(rng, _RUDE_ENDS)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# (question, supporting reason, opposing reason)
OPINIONS = (
    ("Should cities ban cars from their downtown areas?", "Car-free streets are safer, quieter and better for local shops.", "Many people rely on cars, and bans hurt deliveries and disabled visitors."),
    ("Should public transit be free for everyone?", "Free transit cuts traffic and helps people with low incomes.", "Fares pay for upkeep, and free service often gets crowded and worse."),
    ("Should schools require uniforms?", "Uniforms reduce peer pressure and make mornings simpler.", "Uniforms limit self-expression and cost families extra money."),
    ("Should school start later in the morning?", "Teenagers sleep better and learn more with a later start.", "A later start clashes with parents' work hours and after-school activities."),
    ("Should homework be banned in primary school?", "Young children learn best through play and rest after school.", "Short homework builds habits and keeps parents involved."),
    ("Should companies allow permanent remote work?", "Remote work saves commuting time and widens the hiring pool.", "Teams lose spontaneous collaboration when nobody meets in person."),
    ("Should the work week be four days long?", "A shorter week improves focus and reduces burnout.", "Some jobs need daily coverage, and costs would rise for customers."),
    ("Should phones be banned in classrooms?", "Without phones, students pay more attention to lessons.", "Phones are useful learning tools and help in emergencies."),
    ("Should voting be mandatory?", "Mandatory voting makes results reflect the whole population.", "Forcing people to vote brings in uninformed choices."),
    ("Should the voting age be lowered to sixteen?", "Sixteen-year-olds pay taxes and deserve a say in their future.", "Most sixteen-year-olds are not yet ready for that responsibility."),
    ("Should plastic bags be banned in stores?", "Bans cut litter and protect rivers and oceans.", "Alternatives also have costs, and bans burden small shops."),
    ("Should college be free?", "Free college opens opportunity to every talented student.", "Taxpayers carry the cost, including for those who never attend."),
    ("Should zoos exist?", "Good zoos protect endangered species and teach children about nature.", "Wild animals suffer in captivity, however good the zoo."),
    ("Should junk food be taxed?", "A tax nudges people toward healthier choices.", "Such taxes hit poorer families hardest."),
    ("Should cities build more bike lanes?", "Bike lanes make cycling safer and cut traffic.", "Bike lanes take road space from buses and delivery vans."),
    ("Should museums be free to enter?", "Free entry lets everyone enjoy art and history.", "Ticket income keeps collections cared for and open."),
    ("Should people eat less meat?", "Eating less meat is better for health and the climate.", "Meat is a valuable source of protein and a personal choice."),
    ("Should children learn to code in school?", "Coding teaches logic and prepares children for many jobs.", "Schools should focus first on reading, writing and math."),
    ("Should daylight saving time be abolished?", "Changing clocks twice a year disrupts sleep and health.", "Longer summer evenings are good for leisure and business."),
    ("Should social media require real names?", "Real names reduce harassment and fake accounts.", "Anonymity protects people who speak out against abuse."),
    ("Should cities plant more trees?", "Trees cool streets, clean the air and lift moods.", "Trees cost money to maintain and can damage pavements."),
    ("Should libraries stay open late at night?", "Late hours help students and workers who are busy during the day.", "Few people visit at night, so the money is better spent elsewhere."),
    ("Should gym class be required every day?", "Daily exercise keeps students healthy and focused.", "Daily gym takes time from core subjects."),
    ("Should cash be phased out?", "Digital payments are faster and harder to steal.", "Cash protects privacy and serves people without bank accounts."),
    ("Should video games count as a sport?", "Top players train hard and compete at a high level.", "Sports should involve real physical effort."),
    ("Should tipping be replaced by higher wages?", "Fair wages give workers a steady income.", "Tipping rewards good service and keeps prices lower."),
    ("Should cars be banned near schools at drop-off time?", "Car-free streets keep children safe and the air clean.", "Parents with long commutes have no other way to drop off children."),
    ("Should everyone learn a second language?", "A second language opens doors to travel, work and friendship.", "Time is better spent mastering skills people will use daily."),
    ("Should public parks allow dogs off the leash?", "Dogs need space to run and play freely.", "Loose dogs can scare children and harm wildlife."),
    ("Should tests be removed from school admissions?", "Tests favor students who can pay for tutoring.", "Tests give a fair common measure across different schools."),
    ("Should fast food ads be banned on children's television?", "Children cannot judge ads and deserve protection.", "Parents, not bans, should guide what children eat."),
    ("Should cities limit short-term rentals?", "Limits keep homes available and rents affordable for residents.", "Short-term rentals bring tourists and income to local families."),
    ("Should students grade their teachers?", "Feedback from students helps teachers improve.", "Students may grade harshly out of spite rather than fairness."),
    ("Should governments fund space exploration?", "Space research drives new technology and inspires young people.", "The money is needed more urgently for problems here on Earth."),
    ("Should smoking be banned in all public places?", "Bans protect everyone from second-hand smoke.", "Adults should have some places where they may smoke."),
    ("Should electric scooters be allowed on sidewalks?", "Scooters are a clean and cheap way to travel short distances.", "Scooters on sidewalks endanger people walking."),
    ("Should restaurants list calories on menus?", "Calorie counts help diners make informed choices.", "Listing calories is costly for small restaurants and rarely changes habits."),
    ("Should high schools teach personal finance?", "Young adults need to know how to budget, save and borrow.", "Families are better placed to teach money habits."),
    ("Should news sites charge for articles?", "Paid news funds careful reporting.", "Paywalls keep important information from people who cannot pay."),
    ("Should movie theaters ban phones during films?", "Phones distract other viewers and spoil the film.", "People may need to stay reachable for family or work."),
    ("Should children have a daily screen time limit?", "Limits leave time for sleep, play and reading.", "Some screen time is creative and educational."),
    ("Should the minimum wage be raised?", "Higher wages help workers keep up with living costs.", "Small businesses may cut jobs when wages rise quickly."),
    ("Should cities ban fireworks?", "Fireworks scare pets and can start fires.", "Fireworks are a joyful tradition that brings people together."),
    ("Should schools serve only vegetarian lunches?", "Vegetarian lunches are healthy and cheaper to make.", "Students should have a choice of what they eat."),
    ("Should people be allowed to bring pets to work?", "Pets lower stress and make offices friendlier.", "Pets can distract coworkers and trigger allergies."),
    ("Should shops close on Sundays?", "A shared day off gives workers time with family.", "Many people can only shop on weekends."),
    ("Should single-use coffee cups be banned?", "Reusable cups cut waste that cannot be recycled.", "Travelers and busy workers need disposable options."),
    ("Should governments subsidize solar panels?", "Subsidies speed up clean energy and lower bills.", "Subsidies mostly help homeowners who can already afford them."),
    ("Should schools teach cooking?", "Cooking is a life skill that supports healthy eating.", "Cooking is best learned at home."),
    ("Should university lectures be recorded?", "Recordings help students review and catch up after illness.", "Recordings tempt students to skip class."),
    ("Should robots replace cashiers?", "Self-checkout is faster and cuts costs.", "Cashiers provide jobs and help customers who need assistance."),
    ("Should cities have car-free Sundays?", "One car-free day a week gives streets back to people.", "Car-free days make errands hard for people who need to drive."),
    ("Should students choose their own reading books?", "Choice makes students more eager to read.", "Assigned books introduce important classics students would skip."),
    ("Should tourists pay a city entry fee?", "Fees fund upkeep of crowded historic centers.", "Fees discourage visitors and hurt local businesses."),
    ("Should cities ban billboards?", "Billboards clutter views and distract drivers.", "Billboards pay for public services and help local firms."),
    ("Should parents limit sugar in children's diets?", "Less sugar protects teeth and keeps energy steady.", "A few treats are part of a happy childhood."),
    ("Should public buildings have green roofs?", "Green roofs cool buildings and support wildlife.", "Green roofs are costly to build and maintain."),
    ("Should art classes be required in high school?", "Art builds creativity and confidence.", "Students should be free to choose their electives."),
    ("Should offices have open floor plans?", "Open plans make it easy to share ideas.", "Open plans are noisy and make focused work hard."),
    ("Should children learn to swim at school?", "Swimming is a life-saving skill every child deserves.", "Pools are expensive, and parents can arrange lessons."),
    ("Should cities offer free wifi in parks?", "Free wifi helps students and visitors stay connected.", "Public wifi is costly and raises security worries."),
)


def make_opposing(seed: int = DEFAULT_SEED, n_train: int = 50, n_test: int = 10) -> tuple[list[dict], list[dict]]:
    """({id, prompt, support, oppose} rows, {id, prompt} test rows); test prompts are unseen.

    Ids run 1..n_train, then on through the test rows, so no id names two prompts."""
    if n_train + n_test > len(OPINIONS):
        raise ValueError(f"only {len(OPINIONS)} opinion questions, asked for {n_train + n_test}")
    rng = np.random.default_rng([seed, _STREAMS["opposing"]])
    order = rng.permutation(len(OPINIONS))
    train = []
    for k, j in enumerate(order[:n_train]):
        question, pro, con = OPINIONS[j]
        train.append({"id": k + 1, "prompt": question,
                      "support": f"{_pick(rng, ('Yes.', 'I agree.', 'Absolutely.'))} {pro}",
                      "oppose": f"{_pick(rng, ('No.', 'I disagree.', 'Not really.'))} {con}"})
    test = [{"id": n_train + k + 1, "prompt": OPINIONS[j][0]}
            for k, j in enumerate(order[n_train:n_train + n_test])]
    return train, test


# category -> (what it is for, product types, features)
PRODUCT_CATEGORIES = {
    "kitchen": ("everyday cooking", ("mug", "kettle", "blender", "cutting board", "chef knife", "toaster"),
                ("stainless steel", "dishwasher safe", "BPA-free", "16 oz capacity", "non-slip base",
                 "ergonomic handle", "1200 W motor", "auto shut-off")),
    "electronics": ("work and play", ("headset", "speaker", "charger", "keyboard", "mouse", "webcam"),
                    ("Bluetooth 5.3", "20-hour battery", "USB-C charging", "noise cancelling",
                     "water resistant", "1080p video", "backlit keys")),
    "outdoor": ("camping trips", ("tent", "backpack", "lantern", "camping chair", "sleeping bag", "hammock"),
                ("waterproof", "lightweight", "2-person capacity", "foldable frame", "30 L capacity",
                 "rated to 20 F", "reflective trim")),
    "office": ("a tidy desk", ("desk lamp", "notebook", "pen set", "monitor stand", "desk organizer", "office chair"),
               ("adjustable height", "recycled paper", "dimmable light", "bamboo finish",
                "five compartments", "lumbar support", "smooth ink")),
    "fitness": ("home workouts", ("yoga mat", "dumbbell set", "jump rope", "foam roller", "resistance band set", "water bottle"),
                ("non-slip surface", "6 mm thick", "adjustable weight", "tangle-free cable",
                 "high-density foam", "five resistance levels", "leak-proof lid")),
    "home": ("a cozy home", ("throw blanket", "pillow", "vase", "candle", "wall clock", "rug"),
             ("machine washable", "soft fleece", "hand-blown glass", "40-hour burn time",
              "silent movement", "hypoallergenic fill", "cotton weave")),
}
BRANDS = ("Norvik", "Alder", "Brightwell", "Copperline", "Duneway", "Everpeak", "Fernhill",
          "Graylark", "Halden", "Ironbay", "Larkspur", "Moorfield")
STYLES = ("Classic", "Pro", "Lite", "Trail", "Studio", "Compact", "Ultra", "Max")
COLORS = ("black", "white", "navy blue", "forest green", "charcoal gray", "red", "sand", "teal",
          "rose pink", "mustard yellow")


def make_arithmetic(seed: int = DEFAULT_SEED, n: int = 300) -> list[dict]:
    """Questions with a verifiable answer, for online RL (mlxft.rewards.arithmetic): sums of two
    numbers from 1 to 30, asked for the number alone."""
    rng = np.random.default_rng([seed, _STREAMS["arithmetic"]])
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 31, size=2))
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)})
    return rows


def make_products(seed: int = DEFAULT_SEED, n: int = 300) -> list[dict]:
    """{category, name, features, color, description}; the description is a template over the rest:
    "The {name} is a {color} {type} with {f1}, {f2} and {f3}, made for {use}."."""
    rng = np.random.default_rng([seed, _STREAMS["products"]])
    categories = list(PRODUCT_CATEGORIES)
    rows, names = [], set()
    while len(rows) < n:
        category = _pick(rng, categories)
        use, types, features = PRODUCT_CATEGORIES[category]
        kind = _pick(rng, types)
        name = f"{_pick(rng, BRANDS)} {_pick(rng, STYLES)} {kind.title()}"
        if name in names:
            continue
        names.add(name)
        chosen = [features[j] for j in rng.choice(len(features), size=int(rng.integers(2, 4)), replace=False)]
        color = _pick(rng, COLORS)
        listed = ", ".join(chosen[:-1]) + " and " + chosen[-1]
        rows.append({"category": category, "name": name, "features": ", ".join(chosen), "color": color,
                     "description": f"The {name} is a {color} {kind} with {listed}, made for {use}."})
    return rows


# ---------------------------------------------------------------------------------------------
# Writing

def write_samples(out_dir: str | Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """(Re)write every file of SAMPLE_FILES under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    behaviors, news = make_mind(seed)
    train, test = make_opposing(seed)
    u_data, u_item = make_movielens(seed)
    bx_ratings, bx_books = make_bookcrossing(seed)
    texts = {
        "mind-sample/behaviors.tsv": tsv(behaviors),
        "mind-sample/news.tsv": tsv(news),
        "alpaca-sample.json": _json(make_alpaca(seed)),
        "preference-sample.jsonl": "".join(json.dumps(r) + "\n" for r in make_preferences(seed)),
        "opposing-sample.json": _json(train),
        "opposing-test.json": _json(test),
        "products.csv": _csv(make_products(seed)),
        "arithmetic.jsonl": "".join(json.dumps(r) + "\n" for r in make_arithmetic(seed)),
        "movielens-sample/u.data": u_data,
        "movielens-sample/u.item": u_item,
        "bookcrossing-sample/BX-Book-Ratings.csv": bx_ratings,
        "bookcrossing-sample/BX-Books.csv": bx_books,
    }
    paths = []
    for name in SAMPLE_FILES:
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(texts[name].encode("ascii"))  # bytes: no platform newline translation
        paths.append(path)
    return paths


def tsv(rows) -> str:
    for row in rows:
        assert not any("\t" in c or "\n" in c for c in row), row
    return "".join("\t".join(row) + "\n" for row in rows)


def _json(rows) -> str:
    return json.dumps(rows, indent=2) + "\n"


def _csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", "name", "features", "color", "description"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
