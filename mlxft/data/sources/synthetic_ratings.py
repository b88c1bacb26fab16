"""Small synthetic MovieLens-100K and Book-Crossing folders in their real file formats, for the
tallrec-movie and tallrec-book recipes and the converters' tests (the real sets are the users' to
download). Each item belongs to one of four genres its title's noun gives away; each user prefers
one genre and likes its items 80% of the time, the others' 25%: a history says something about
the target, as in the real data.
"""

from __future__ import annotations

import numpy as np

GENRE_NOUNS = (("Star", "Planet", "Orbit", "Comet", "Rocket"), ("Heart", "Kiss", "Wedding", "Letter", "Rose"),
               ("Heist", "Detective", "Alibi", "Verdict", "Witness"), ("Picnic", "Prank", "Circus", "Sitcom", "Pie"))
ADJECTIVES = ("Silent", "Golden", "Last", "Broken", "Hidden", "Second", "Midnight", "Lucky", "Wild", "Little", "Final",
              "Crimson")
AUTHORS = (("Ada Vance", "Orson Kepler"), ("Clara Bloom", "Jules Amour"), ("Sam Marlowe", "Nora Blackwood"),
           ("Penny Lark", "Otto Giggles"))
LIKE_OWN, LIKE_OTHER = 0.8, 0.25


def items(rng, n: int) -> list[tuple[str, int]]:
    """(name, genre) of n items with distinct names."""
    names = [(f"{a} {noun}", g) for g, nouns in enumerate(GENRE_NOUNS) for noun in nouns for a in ADJECTIVES]
    order = rng.permutation(len(names))[:n]
    return [names[i] for i in order]


def ratings(rng, users: int, catalogue: list[tuple[str, int]], per_user: tuple[int, int]) -> list[tuple[int, int, bool]]:
    """(user, item index, liked) in order of time, each user rating distinct items."""
    out = []
    for user in range(1, users + 1):
        favourite = int(rng.integers(len(GENRE_NOUNS)))
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        for item in rng.permutation(len(catalogue))[:n]:
            p = LIKE_OWN if catalogue[item][1] == favourite else LIKE_OTHER
            out.append((user, int(item), bool(rng.random() < p)))
    return out


def make_movielens(seed: int) -> tuple[str, str]:
    """(u.data, u.item) texts: 40 users x 20-30 ratings of 60 movies."""
    rng = np.random.default_rng([seed, 11])
    movies = items(rng, 60)
    genre_flags = "|".join(["0"] * 19)
    u_item = "".join(f"{i + 1}|{name} ({1970 + int(rng.integers(30))})|01-Jan-1995||http://example.invalid/{i + 1}|{genre_flags}\n"
                     for i, (name, _) in enumerate(movies))
    time, lines = 874_000_000, []
    for user, item, liked in ratings(rng, 40, movies, (20, 30)):
        time += int(rng.integers(1, 5000))
        stars = int(rng.integers(4, 6)) if liked else int(rng.integers(1, 4))
        lines.append(f"{user}\t{item + 1}\t{stars}\t{time}\n")
    order = rng.permutation(len(lines))  # u.data is not in time order; the converter sorts
    return "".join(lines[i] for i in order), u_item


def make_bookcrossing(seed: int) -> tuple[str, str]:
    """(BX-Book-Ratings.csv, BX-Books.csv) texts: 150 users x 2-12 ratings of 80 books, one
    rating of a book the catalogue lacks and one malformed catalogue line, as the real dump has."""
    rng = np.random.default_rng([seed, 12])
    books = items(rng, 80)
    isbns = [f"{int(rng.integers(10**9)):09d}X" for _ in books]
    header = '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"\n'
    catalogue = header + "".join(
        f'"{isbn}";"{name}";"{AUTHORS[genre][int(rng.integers(2))]}";"{1980 + int(rng.integers(25))}";"Example Press";'
        f'"http://example.invalid/s";"http://example.invalid/m";"http://example.invalid/l"\n'
        for isbn, (name, genre) in zip(isbns, books))
    catalogue += '"0000000000";"A title with a stray "quote" in it;"\n'  # unparseable: skipped and counted
    rows = ['"User-ID";"ISBN";"Book-Rating"\n']
    for user, item, liked in ratings(rng, 150, books, (2, 12)):
        score = int(rng.integers(6, 11)) if liked else int(rng.choice([0, 0, 2, 3, 4, 5]))
        rows.append(f'"{1000 + user}";"{isbns[item]}";"{score}"\n')
    rows.append('"1001";"9999999999";"8"\n')  # a book the catalogue lacks: dropped by the join
    return "".join(rows), catalogue
