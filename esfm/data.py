"""MovieLens loading, profile normalization and the feature vocabulary.

Reads the original GroupLens files of MovieLens 1M (``users.dat``,
``movies.dat``, ``ratings.dat``, ``::``-separated, ISO-8859-1) and MovieLens
100K (``u.data``, ``u.user``, ``u.item``, ``u.occupation``). Every file may also
be stored compressed as ``NAME.xz`` or ``NAME.gz``.

Both datasets come out in the MovieLens 1M vocabulary: ages as the seven
bucket codes and occupations as the codes 0 to 20. MovieLens 100K stores raw
ages and occupation names, which are mapped as follows.

Raw age to bucket (``AGE_BUCKETS``): under 18 -> ``1``, 18-24 -> ``18``,
25-34 -> ``25``, 35-44 -> ``35``, 45-49 -> ``45``, 50-55 -> ``50``,
56 and over -> ``56``.

MovieLens 100K occupation to MovieLens 1M code (``ML100K_OCCUPATIONS``):

============== ==== ============================================
100K name      code 1M meaning
============== ==== ============================================
administrator  3    clerical/admin
artist         2    artist
doctor         6    doctor/health care
educator       1    academic/educator
engineer       17   technician/engineer
entertainment  0    other (1M has no entertainment code)
executive      7    executive/managerial
healthcare     6    doctor/health care
homemaker      9    homemaker
lawyer         11   lawyer
librarian      0    other (1M has no librarian code)
marketing      14   sales/marketing
none           0    "other" or not specified
other          0    "other" or not specified
programmer     12   programmer
retired        13   retired
salesman       14   sales/marketing
scientist      15   scientist
student        4    college/grad student; 10 (K-12 student) when
                    the user's raw age is under 18
technician     17   technician/engineer
writer         20   writer
============== ==== ============================================
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import logging
import lzma
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esfm.errors import DataError, QueryError

logger = logging.getLogger(__name__)

ML1M = "ml-1m"
ML100K = "ml-100k"

AGE_BUCKETS: dict[str, str] = {
    "1": "Under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "56+",
}

OCCUPATIONS: dict[str, str] = {
    "0": "other",
    "1": "academic/educator",
    "2": "artist",
    "3": "clerical/admin",
    "4": "college/grad student",
    "5": "customer service",
    "6": "doctor/health care",
    "7": "executive/managerial",
    "8": "farmer",
    "9": "homemaker",
    "10": "K-12 student",
    "11": "lawyer",
    "12": "programmer",
    "13": "retired",
    "14": "sales/marketing",
    "15": "scientist",
    "16": "self-employed",
    "17": "technician/engineer",
    "18": "tradesman/craftsman",
    "19": "unemployed",
    "20": "writer",
}

ML100K_OCCUPATIONS: dict[str, str] = {
    "administrator": "3",
    "artist": "2",
    "doctor": "6",
    "educator": "1",
    "engineer": "17",
    "entertainment": "0",
    "executive": "7",
    "healthcare": "6",
    "homemaker": "9",
    "lawyer": "11",
    "librarian": "0",
    "marketing": "14",
    "none": "0",
    "other": "0",
    "programmer": "12",
    "retired": "13",
    "salesman": "14",
    "scientist": "15",
    "student": "4",
    "technician": "17",
    "writer": "20",
}

GENDERS: dict[str, str] = {"m": "M", "male": "M", "f": "F", "female": "F"}

# Genre columns 6 to 24 of u.item, in the order of u.genre. "unknown" is a
# placeholder flag, not a genre, so it becomes an empty genre list.
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# The 18 genres that MovieLens 100K and 1M share.
GENRES = ML100K_GENRES[1:]


def normalize_genre(genre: str) -> str:
    """Return the MovieLens spelling of ``genre``, matched case-insensitively.

    Raises:
        QueryError: not a MovieLens genre; the message lists the valid ones.
    """
    by_lower = {name.lower(): name for name in GENRES}
    key = str(genre).strip().lower()
    if key not in by_lower:
        raise QueryError(
            f"unknown genre {genre!r}",
            hint=f"use one of: {', '.join(GENRES)}",
        )
    return by_lower[key]


# Alternate spellings that the ML-1M README uses for some occupation codes.
_OCCUPATION_ALIASES: dict[str, str] = {
    '"other" or not specified': "0",
    "not specified": "0",
    "k-12 student": "10",
}

DOWNLOAD_URLS: dict[str, str] = {
    ML1M: "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    ML100K: "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
}

_DATASET_ALIASES: dict[str, str] = {
    "ml-1m": ML1M,
    "movielens-1m": ML1M,
    "1m": ML1M,
    "ml-100k": ML100K,
    "movielens-100k": ML100K,
    "100k": ML100K,
}

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    ML1M: ("users.dat", "movies.dat", "ratings.dat"),
    ML100K: ("u.data", "u.user", "u.item"),
}

FEATURE_TYPES = ("user", "movie", "age", "gender", "occupation", "genre")
USER_SIDE_TYPES = ("user", "age", "gender", "occupation")

_COMPRESSED_SUFFIXES = ("", ".xz", ".gz", ".bz2")


@dataclasses.dataclass(frozen=True)
class MovieLensDataset:
    """One MovieLens dataset in the MovieLens 1M vocabulary.

    Attributes:
        name: ``"ml-1m"`` or ``"ml-100k"``.
        ratings: columns ``user`` and ``movie`` (int64 MovieLens ids) and
            ``rating`` (float32, 1 to 5), one row per (user, movie) pair.
        users: indexed by user id (int64); columns ``age`` (bucket code),
            ``gender`` (``M``/``F``) and ``occupation`` (code ``0`` to ``20``),
            all strings.
        movies: indexed by movie id (int64); columns ``title`` (str) and
            ``genres`` (list of genre names).
    """

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    movies: pd.DataFrame

    def subset_users(self, user_ids: Iterable[int]) -> MovieLensDataset:
        """Return the dataset restricted to ``user_ids`` and their ratings."""
        keep = pd.Index(sorted(set(int(user) for user in user_ids)), dtype="int64")
        ratings = self.ratings[self.ratings["user"].isin(keep)].reset_index(drop=True)
        return MovieLensDataset(self.name, ratings, self.users.loc[keep], self.movies)

    def summary(self) -> dict[str, Any]:
        """Return counts for ``esfm data info``."""
        counts = self.ratings["rating"].value_counts().sort_index()
        return {
            "dataset": self.name,
            "ratings": int(len(self.ratings)),
            "users": int(len(self.users)),
            "movies": int(len(self.movies)),
            "rated_movies": int(self.ratings["movie"].nunique()),
            "genres": sorted({g for gs in self.movies["genres"] for g in gs}),
            "rating_counts": {str(int(r)): int(n) for r, n in counts.items()},
            "mean_rating": float(self.ratings["rating"].mean()),
        }


# ---------------------------------------------------------------------------
# Profile normalization (used by the query side)


def _valid_ages() -> str:
    labels = ", ".join(f"{code} ({label})" for code, label in AGE_BUCKETS.items())
    return f"a bucket code or label: {labels}; or a raw age from 0 to 120"


def age_bucket(raw_age: int) -> str:
    """Map a raw age in years to its MovieLens 1M bucket code."""
    if raw_age < 0 or raw_age > 120:
        raise QueryError(
            f"invalid age {raw_age!r}: a raw age must be between 0 and 120",
            hint=f"valid ages: {_valid_ages()}",
        )
    for lower, code in ((56, "56"), (50, "50"), (45, "45"), (35, "35"), (25, "25")):
        if raw_age >= lower:
            return code
    return "18" if raw_age >= 18 else "1"


def normalize_age(age: str | int) -> str:
    """Return the bucket code for a bucket code, range label or raw age.

    Bucket codes and raw ages never disagree: ``"25"`` is both the code of
    25-34 and a raw age inside it.
    """
    if isinstance(age, bool):
        raise QueryError(f"invalid age {age!r}", hint=f"valid ages: {_valid_ages()}")
    if isinstance(age, int):
        return age_bucket(age)
    text = str(age).strip()
    if text in AGE_BUCKETS:
        return text
    for code, label in AGE_BUCKETS.items():
        if text.lower() == label.lower():
            return code
    if re.fullmatch(r"\d{1,3}", text):
        return age_bucket(int(text))
    raise QueryError(f"invalid age {age!r}", hint=f"valid ages: {_valid_ages()}")


def normalize_gender(gender: str) -> str:
    """Return ``M`` or ``F`` for M/F/male/female in any case."""
    key = str(gender).strip().lower()
    if key in GENDERS:
        return GENDERS[key]
    raise QueryError(
        f"invalid gender {gender!r}", hint="valid genders: M, F, male, female"
    )


def _occupation_codes_by_name() -> dict[str, str]:
    names = {name.lower(): code for code, name in OCCUPATIONS.items()}
    names.update(_OCCUPATION_ALIASES)
    for name, code in ML100K_OCCUPATIONS.items():
        names.setdefault(name, code)
    return names


_OCCUPATION_BY_NAME = _occupation_codes_by_name()


def normalize_occupation(occupation: str | int) -> str:
    """Return the MovieLens 1M code for an occupation code or name.

    Names are matched case-insensitively against the MovieLens 1M names
    (``"college/grad student"``) and the MovieLens 100K names (``"engineer"``).
    """
    if isinstance(occupation, bool):
        raise QueryError(f"invalid occupation {occupation!r}")
    text = str(occupation).strip()
    if re.fullmatch(r"\d{1,2}", text) and str(int(text)) in OCCUPATIONS:
        return str(int(text))
    code = _OCCUPATION_BY_NAME.get(text.lower())
    if code is not None:
        return code
    valid = ", ".join(f"{code} ({name})" for code, name in OCCUPATIONS.items())
    raise QueryError(
        f"invalid occupation {occupation!r}",
        hint=f"valid occupations (code or name): {valid}",
    )


def normalize_user(user: str | int) -> str:
    """Return a user id as its canonical decimal string."""
    text = str(user).strip()
    if isinstance(user, bool) or not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise QueryError(
            f"invalid user id {user!r}", hint="a user id is a positive integer"
        )
    return str(int(text))


def normalize_profile(
    *,
    age: str | int | None = None,
    gender: str | None = None,
    occupation: str | int | None = None,
    user: str | int | None = None,
) -> dict[str, str]:
    """Canonicalize user-side query values to the model's feature values.

    Args:
        age: bucket code (``"18"``), range label (``"18-24"``, ``"56+"``,
            ``"Under 18"``) or raw age in years (``30`` or ``"30"``).
        gender: ``M``/``F`` or ``male``/``female``, any case.
        occupation: code ``0`` to ``20`` or a MovieLens 1M or 100K name, any case.
        user: MovieLens user id.

    Returns:
        The given fields only, keyed by feature type, with string values such
        as ``{"age": "18", "gender": "F", "occupation": "4"}``.

    Raises:
        QueryError: a value is invalid; the message names it and the hint
            lists the valid values.
    """
    profile: dict[str, str] = {}
    if user is not None:
        profile["user"] = normalize_user(user)
    if age is not None:
        profile["age"] = normalize_age(age)
    if gender is not None:
        profile["gender"] = normalize_gender(gender)
    if occupation is not None:
        profile["occupation"] = normalize_occupation(occupation)
    return profile


# ---------------------------------------------------------------------------
# File reading


def _find_file(directory: Path, name: str) -> Path:
    for suffix in _COMPRESSED_SUFFIXES:
        candidate = directory / (name + suffix)
        if candidate.is_file():
            return candidate
    raise DataError(
        f"missing file {name} (or {name}.xz, {name}.gz) in {str(directory)!r}",
        hint="point --data at an extracted MovieLens folder, "
        "or run: esfm data fetch movielens-1m --dest DIR",
    )


def _decompress(path: Path, raw: bytes) -> bytes:
    # The magic bytes decide, so a compressed file with a plain name still reads.
    try:
        if raw[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(raw)
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh" and path.suffix == ".bz2":
            return bz2.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"cannot decompress {str(path)!r}: {exc}",
            hint="the archive is truncated or corrupt; download the dataset again",
        ) from exc
    if path.suffix in (".xz", ".gz", ".bz2"):
        raise DataError(
            f"{str(path)!r} is named {path.suffix} but is not {path.suffix} data",
            hint="rename the file without the suffix or recompress it",
        )
    return raw


def read_text(path: Path) -> str:
    """Read a MovieLens text file, decompressing ``.xz``/``.gz``/``.bz2``.

    The originals are ISO-8859-1. A file that is valid UTF-8 (for example a
    re-encoded ``movies.dat``) is decoded as UTF-8 so titles stay intact.

    Raises:
        DataError: the file is unreadable, empty, corrupt or not text.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    raw = _decompress(path, raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise DataError(
            f"{str(path)!r} is empty",
            hint="download the dataset again: esfm data fetch movielens-1m --dest DIR",
        )
    if b"\x00" in raw[:65536]:
        raise DataError(
            f"{str(path)!r} is not ISO-8859-1 or UTF-8 text: it contains NUL bytes, "
            "as UTF-16 files and binary files do",
            hint=f"convert it, for example: iconv -f UTF-16 -t LATIN1 {path.name}",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # Copies edited on Windows end lines with CRLF.
    return text.replace("\r\n", "\n")


def _line_at(text: str, lineno: int) -> str:
    lines = text.splitlines()
    if 1 <= lineno <= len(lines):
        return lines[lineno - 1]
    return ""


def _malformed(
    path: Path, text: str, lineno: int, problem: str, expected: str
) -> DataError:
    content = _line_at(text, lineno)
    return DataError(
        f"malformed line {lineno} in {str(path)!r}: {problem}: {content!r}",
        hint=f"each line must be {expected}; fix or delete line {lineno}",
    )


def _check_separator(path: Path, text: str, separator: str, expected: str) -> None:
    first = text.split("\n", 1)[0]
    if separator in first:
        return
    for other in ("::", "\t", "|", ",", ";"):
        if other != separator and other in first:
            raise DataError(
                f"{str(path)!r} uses {other!r} as separator, expected {separator!r}: "
                f"{first!r}",
                hint=f"each line must be {expected}; is this file from the other "
                "MovieLens dataset?",
            )
    raise DataError(
        f"{str(path)!r} has no {separator!r} separator on line 1: {first!r}",
        hint=f"each line must be {expected}",
    )


def _check_field_counts(
    path: Path, text: str, text_c: str, separator: str, fields: int, expected: str
) -> None:
    lines = text_c.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    counts = pd.Series(lines, dtype=object).str.count(re.escape(separator)) + 1
    bad = (counts != fields).to_numpy()
    if not bad.any():
        return
    row = int(np.flatnonzero(bad)[0])
    if not lines[row].strip():
        problem = "empty line"
    else:
        problem = f"{int(counts.iat[row])} fields, expected {fields}"
        if counts.iat[row] < fields:
            problem = f"too few fields ({problem})"
    raise _malformed(path, text, row + 1, problem, expected)


_PARSER_LINE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _read_table(
    path: Path, text: str, separator: str, columns: list[str], expected: str
) -> pd.DataFrame:
    """Split ``text`` into string columns; row ``i`` is line ``i + 1``."""
    _check_separator(path, text, separator, expected)
    if len(separator) > 1:
        if "\x1f" in text:
            raise _malformed(
                path,
                text,
                text[: text.index("\x1f")].count("\n") + 1,
                "contains the control character U+001F",
                expected,
            )
        text_c = text.replace(separator, "\x1f")
        separator_c = "\x1f"
    else:
        text_c, separator_c = text, separator
    _check_field_counts(path, text, text_c, separator_c, len(columns), expected)
    try:
        frame = pd.read_csv(
            io.StringIO(text_c),
            sep=separator_c,
            header=None,
            names=columns,
            dtype=str,
            engine="c",
            quoting=csv.QUOTE_NONE,
            na_filter=False,
            skip_blank_lines=False,
            keep_default_na=False,
        )
    except pd.errors.ParserError as exc:
        _raise_if_interrupted(exc)
        match = _PARSER_LINE.search(str(exc))
        if match is None:
            raise DataError(f"cannot parse {str(path)!r}: {exc}") from exc
        expected_fields, lineno, seen = (int(group) for group in match.groups())
        raise _malformed(
            path, text, lineno, f"{seen} fields, expected {expected_fields}", expected
        ) from exc
    return frame


def _to_int(
    path: Path, text: str, frame: pd.DataFrame, column: str, expected: str
) -> np.ndarray:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _malformed(
            path,
            text,
            row + 1,
            f"{column} {frame[column].iat[row]!r} is not an integer",
            expected,
        )
    values = values.to_numpy()
    fractional = values != np.floor(values)
    if fractional.any():
        row = int(np.flatnonzero(fractional)[0])
        raise _malformed(
            path,
            text,
            row + 1,
            f"{column} {frame[column].iat[row]!r} is not an integer",
            expected,
        )
    return values.astype(np.int64)


def _check_unique(path: Path, text: str, ids: np.ndarray, what: str) -> None:
    duplicated = pd.Series(ids).duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise DataError(
            f"duplicate {what} {ids[row]} in {str(path)!r} on lines {first + 1} "
            f"and {row + 1}: {_line_at(text, row + 1)!r}",
            hint=f"keep one line per {what}",
        )


# ---------------------------------------------------------------------------
# Ratings, users and movies


def _raise_if_interrupted(error: pd.errors.ParserError) -> None:
    """Re-raise Ctrl-C that pandas reported as a failed read of the buffer.

    pandas turns an exception raised while its C parser reads the buffer,
    such as the KeyboardInterrupt of a SIGINT, into this ParserError. Reading
    an in-memory buffer does no I/O, so this message means such an exception.
    """
    if "on source failed" in str(error):
        raise KeyboardInterrupt from error


def _read_integer_columns(
    text: str, separator: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Parse well-formed rating lines quickly; None when any line is not.

    Parsing straight to int64 keeps the peak memory of MovieLens 1M low. On
    any irregularity the caller falls back to the string parser, which names
    the bad line.
    """
    if len(separator) > 1:
        if "\x1f" in text:
            return None
        text = text.replace(separator, "\x1f")
        separator = "\x1f"
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=separator,
            header=None,
            names=["user", "movie", "rating", "timestamp"],
            usecols=["user", "movie", "rating"],
            dtype=np.int64,
            engine="c",
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=False,
        )
    except pd.errors.ParserError as exc:
        _raise_if_interrupted(exc)
        return None
    except (ValueError, OverflowError):
        return None
    lines = text.count("\n") + (not text.endswith("\n"))
    # Extra fields would silently become an index, so count the separators.
    # A short line cannot offset a long one: its empty field fails int64.
    if len(frame) != lines or text.count(separator) != 3 * lines:
        return None
    return tuple(frame[name].to_numpy() for name in ("user", "movie", "rating"))


def _parse_ratings(
    path: Path,
    text: str,
    separator: str,
    users: pd.DataFrame,
    movies: pd.DataFrame,
) -> pd.DataFrame:
    expected = (
        f"user{separator}movie{separator}rating{separator}timestamp "
        f"with integer fields (separator {separator!r})"
    )
    columns = _read_integer_columns(text, separator)
    if columns is None:
        # The strict string parser finds the first bad line and raises.
        frame = _read_table(
            path, text, separator, ["user", "movie", "rating", "timestamp"], expected
        )
        columns = tuple(
            _to_int(path, text, frame, name, expected)
            for name in ("user", "movie", "rating")
        )
    user, movie, rating = columns

    outside = (rating < 1) | (rating > 5)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise _malformed(
            path, text, row + 1, f"rating {rating[row]} is outside 1 to 5", expected
        )
    for ids, table, what in ((user, users, "user"), (movie, movies, "movie")):
        unknown = ~np.isin(ids, table.index.to_numpy())
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"line {row + 1} of {str(path)!r} rates unknown {what} {ids[row]} "
                f"({int(unknown.sum())} lines reference unknown {what}s): "
                f"{_line_at(text, row + 1)!r}",
                hint=f"add the {what} to its file or delete the ratings that "
                "reference it",
            )
    pair = user * (int(movie.max()) + 1) + movie
    duplicated = pd.Series(pair).duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(pair == pair[row])[0])
        raise DataError(
            f"duplicate rating of movie {movie[row]} by user {user[row]} in "
            f"{str(path)!r} on lines {first + 1} and {row + 1}",
            hint="keep one rating per (user, movie) pair",
        )
    return pd.DataFrame(
        {
            "user": user,
            "movie": movie,
            "rating": rating.astype(np.float32),
        }
    )


def _normalize_column(
    path: Path,
    text: str,
    values: Iterable[str],
    normalize: Callable[[str], str],
    what: str,
    expected: str,
) -> list[str]:
    result = []
    for row, value in enumerate(values):
        try:
            result.append(normalize(value))
        except QueryError as exc:
            raise _malformed(
                path, text, row + 1, f"invalid {what} {value!r}", expected
            ) from exc
    return result


def _load_ml1m_users(directory: Path) -> pd.DataFrame:
    path = _find_file(directory, "users.dat")
    text = read_text(path)
    expected = "UserID::Gender::Age::Occupation::Zip-code"
    frame = _read_table(
        path, text, "::", ["user", "gender", "age", "occupation", "zip"], expected
    )
    ids = _to_int(path, text, frame, "user", expected)
    _check_unique(path, text, ids, "user")
    age = _normalize_column(path, text, frame["age"], _bucket_code, "age", expected)
    gender = _normalize_column(
        path, text, frame["gender"], normalize_gender, "gender", expected
    )
    occupation = _normalize_column(
        path, text, frame["occupation"], normalize_occupation, "occupation", expected
    )
    return _users_frame(ids, age, gender, occupation)


def _bucket_code(value: str) -> str:
    # users.dat must hold bucket codes; a raw age there means a different file.
    if value.strip() not in AGE_BUCKETS:
        raise QueryError(f"invalid age bucket {value!r}")
    return value.strip()


def _users_frame(
    ids: np.ndarray, age: list[str], gender: list[str], occupation: list[str]
) -> pd.DataFrame:
    return pd.DataFrame(
        {"age": age, "gender": gender, "occupation": occupation},
        index=pd.Index(ids, name="user", dtype="int64"),
    )


def _movies_frame(ids: np.ndarray, titles: list[str], genres: list[list[str]]):
    return pd.DataFrame(
        {"title": titles, "genres": genres},
        index=pd.Index(ids, name="movie", dtype="int64"),
    )


def _load_ml1m_movies(directory: Path) -> pd.DataFrame:
    path = _find_file(directory, "movies.dat")
    text = read_text(path)
    expected = "MovieID::Title::Genres with genres separated by '|'"
    frame = _read_table(path, text, "::", ["movie", "title", "genres"], expected)
    ids = _to_int(path, text, frame, "movie", expected)
    _check_unique(path, text, ids, "movie")
    genres = [
        [genre for genre in value.split("|") if genre and genre != "(no genres listed)"]
        for value in frame["genres"]
    ]
    return _movies_frame(ids, list(frame["title"]), genres)


def _load_ml100k_users(directory: Path) -> pd.DataFrame:
    path = _find_file(directory, "u.user")
    text = read_text(path)
    expected = "user id|age|gender|occupation|zip code"
    frame = _read_table(
        path, text, "|", ["user", "age", "gender", "occupation", "zip"], expected
    )
    ids = _to_int(path, text, frame, "user", expected)
    _check_unique(path, text, ids, "user")
    raw_ages = _to_int(path, text, frame, "age", expected)
    ages = _normalize_column(
        path,
        text,
        (str(value) for value in raw_ages),
        lambda value: age_bucket(int(value)),
        "age",
        expected,
    )
    gender = _normalize_column(
        path, text, frame["gender"], normalize_gender, "gender", expected
    )
    known = _read_ml100k_occupations(directory)
    occupation = []
    for row, (name, raw_age) in enumerate(
        zip(frame["occupation"], raw_ages, strict=True)
    ):
        key = name.strip().lower()
        if known is not None and key not in known and not key.isdigit():
            raise _malformed(
                path,
                text,
                row + 1,
                f"occupation {name!r} is not listed in u.occupation",
                expected,
            )
        try:
            code = normalize_occupation(name)
        except QueryError as exc:
            raise _malformed(
                path, text, row + 1, f"invalid occupation {name!r}", expected
            ) from exc
        if key == "student" and raw_age < 18:
            code = "10"
        occupation.append(code)
    return _users_frame(ids, ages, gender, occupation)


def _read_ml100k_occupations(directory: Path) -> set[str] | None:
    try:
        path = _find_file(directory, "u.occupation")
    except DataError:
        return None
    names = {line.strip().lower() for line in read_text(path).splitlines()}
    names.discard("")
    return names


def _load_ml100k_movies(directory: Path) -> pd.DataFrame:
    path = _find_file(directory, "u.item")
    text = read_text(path)
    expected = (
        "movie id|title|release date|video release date|IMDb URL|"
        "19 genre flags (0 or 1)"
    )
    genre_columns = [f"g{index}" for index in range(len(ML100K_GENRES))]
    frame = _read_table(
        path,
        text,
        "|",
        ["movie", "title", "release", "video", "url", *genre_columns],
        expected,
    )
    ids = _to_int(path, text, frame, "movie", expected)
    _check_unique(path, text, ids, "movie")
    flags = np.stack(
        [_to_int(path, text, frame, column, expected) for column in genre_columns],
        axis=1,
    )
    bad = ~np.isin(flags, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise _malformed(path, text, row + 1, "a genre flag is not 0 or 1", expected)
    genres = [
        [ML100K_GENRES[column] for column in np.flatnonzero(row) if column > 0]
        for row in flags
    ]
    return _movies_frame(ids, list(frame["title"]), genres)


def detect_dataset(directory: str | os.PathLike[str]) -> str:
    """Return ``"ml-1m"`` or ``"ml-100k"`` from the files in ``directory``.

    Raises:
        DataError: the folder is missing or contains neither dataset.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataError(
            f"data folder {str(path)!r} does not exist",
            hint="run: esfm data fetch movielens-1m --dest DIR",
        )
    for name in (ML1M, ML100K):
        marker = REQUIRED_FILES[name][-1] if name == ML1M else "u.data"
        if any((path / (marker + s)).is_file() for s in _COMPRESSED_SUFFIXES):
            return name
    for name in (ML1M, ML100K):
        if (path / name).is_dir():
            raise DataError(
                f"{str(path)!r} contains no MovieLens files, but its subfolder "
                f"{name}/ may",
                hint=f"pass --data {path / name}",
            )
    raise DataError(
        f"no MovieLens files found in {str(path)!r}: expected MovieLens 1M "
        "(ratings.dat, users.dat, movies.dat) or MovieLens 100K "
        "(u.data, u.user, u.item)",
        hint="run: esfm data fetch movielens-1m --dest DIR",
    )


def load_movielens(directory: str | os.PathLike[str]) -> MovieLensDataset:
    """Load MovieLens 1M or 100K from ``directory``, detecting which.

    Raises:
        DataError: a file is missing, empty, malformed (the message names the
            file, the line number and its content), has a rating outside 1 to
            5, rates an unknown user or movie, or repeats a (user, movie) pair.
    """
    path = Path(directory)
    name = detect_dataset(path)
    if name == ML1M:
        users = _load_ml1m_users(path)
        movies = _load_ml1m_movies(path)
        ratings_path = _find_file(path, "ratings.dat")
        separator = "::"
    else:
        users = _load_ml100k_users(path)
        movies = _load_ml100k_movies(path)
        ratings_path = _find_file(path, "u.data")
        separator = "\t"
    text = read_text(ratings_path)
    ratings = _parse_ratings(ratings_path, text, separator, users, movies)
    logger.info(
        "loaded %s from %s: %d ratings, %d users, %d movies",
        name,
        path,
        len(ratings),
        len(users),
        len(movies),
    )
    return MovieLensDataset(name, ratings, users, movies)


# ---------------------------------------------------------------------------
# Download


def resolve_dataset_name(name: str) -> str:
    """Return ``"ml-1m"`` or ``"ml-100k"`` for a name such as ``movielens-1m``."""
    key = name.strip().lower()
    if key not in _DATASET_ALIASES:
        raise DataError(
            f"unknown dataset {name!r}",
            hint="valid names: movielens-1m (ml-1m), movielens-100k (ml-100k)",
        )
    return _DATASET_ALIASES[key]


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    folder: str,
    required: Iterable[str],
) -> Path:
    """Verify a zip file and extract its ``folder/`` atomically into ``dest``.

    The archive is checked with CRCs, must not contain absolute paths or
    ``..`` components, and must hold ``folder/NAME`` for each required name.
    Extraction goes into a temporary sibling folder that is renamed to
    ``dest/folder`` only when complete. An existing ``dest/folder`` is moved
    aside first and deleted after the rename.

    Returns:
        The extracted folder ``dest/folder``.

    Raises:
        DataError: the file is not a valid zip, is corrupt, is unsafe or
            lacks a required file.
    """
    archive_path = Path(archive)
    dest_path = Path(dest)
    if not zipfile.is_zipfile(archive_path):
        raise DataError(
            f"{str(archive_path)!r} is not a zip file",
            hint="the download was interrupted or replaced; fetch it again",
        )
    try:
        with zipfile.ZipFile(archive_path) as zf:
            bad_member = zf.testzip()
            if bad_member is not None:
                raise DataError(
                    f"corrupt member {bad_member!r} in {str(archive_path)!r} "
                    "(CRC mismatch)",
                    hint="fetch the archive again",
                )
            names = zf.namelist()
            for member in names:
                parts = Path(member).parts
                if member.startswith(("/", "\\")) or ".." in parts:
                    raise DataError(
                        f"unsafe path {member!r} in {str(archive_path)!r}",
                        hint="use the archive from files.grouplens.org",
                    )
            missing = [n for n in required if f"{folder}/{n}" not in names]
            if missing:
                raise DataError(
                    f"{str(archive_path)!r} lacks {', '.join(missing)} under {folder}/",
                    hint="use the archive from files.grouplens.org",
                )
            dest_path.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=dest_path))
            try:
                for member in names:
                    if member.startswith(f"{folder}/"):
                        zf.extract(member, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"corrupt zip file {str(archive_path)!r}: {exc}",
            hint="fetch the archive again",
        ) from exc

    target = dest_path / folder
    old = None
    if target.exists():
        old = dest_path / f".{folder}.old.{os.getpid()}"
        os.replace(target, old)
    os.replace(staging / folder, target)
    shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def fetch_movielens(
    name: str,
    dest: str | os.PathLike[str],
    on_progress: Callable[[int, int | None], None] | None = None,
    *,
    url: str | None = None,
) -> Path:
    """Download a MovieLens zip from GroupLens and extract it into ``dest``.

    Args:
        name: ``movielens-1m``/``ml-1m`` or ``movielens-100k``/``ml-100k``.
        dest: folder that receives ``ml-1m/`` or ``ml-100k/``.
        on_progress: called with (bytes received, total bytes or None).
        url: download address; the GroupLens address by default.

    Returns:
        The extracted dataset folder.

    Raises:
        DataError: the download failed or the archive is invalid.
    """
    dataset = resolve_dataset_name(name)
    source = url or DOWNLOAD_URLS[dataset]
    dest_path = Path(dest)
    created = not dest_path.exists()
    dest_path.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{dataset}.", suffix=".zip", dir=dest)
    logger.info("downloading %s from %s", dataset, source)
    succeeded = False
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(source, timeout=60) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    received = 0
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        received += len(chunk)
                        if on_progress is not None:
                            on_progress(received, total)
            except OSError as exc:
                raise DataError(
                    f"download of {source} failed: {exc}",
                    hint="check the network connection, or download the zip by "
                    "hand and unpack it",
                ) from exc
        required = list(REQUIRED_FILES[dataset])
        extracted = extract_archive(
            temporary, dest_path, folder=dataset, required=required
        )
        succeeded = True
        return extracted
    finally:
        Path(temporary).unlink(missing_ok=True)
        # Leave no empty folder behind a failed first download.
        if created and not succeeded and not any(dest_path.iterdir()):
            dest_path.rmdir()


# ---------------------------------------------------------------------------
# Feature vocabulary and encoding


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Feature rows: row ``i`` of the model belongs to ``features[i]``.

    Order: users, movies (both by numeric id), ages, genders, occupations,
    then genres when enabled.
    """

    features: tuple[tuple[str, str], ...]
    genres: bool
    rows: Mapping[tuple[str, str], int] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rows = {feature: row for row, feature in enumerate(self.features)}
        object.__setattr__(self, "rows", rows)

    @property
    def size(self) -> int:
        return len(self.features)

    def row(self, feature_type: str, value: str) -> int:
        """Return the row of one feature, raising QueryError when unknown."""
        try:
            return self.rows[(feature_type, value)]
        except KeyError:
            raise QueryError(
                f"unknown {feature_type} {value!r}: not in the model vocabulary"
            ) from None


def build_vocabulary(dataset: MovieLensDataset, *, genres: bool) -> Vocabulary:
    """List the features of ``dataset``: every user and movie of its tables.

    Movies that no rating mentions are included, so the index can serve them,
    but training leaves their rows at the initial values.
    """
    features: list[tuple[str, str]] = []
    features += [("user", str(user)) for user in sorted(dataset.users.index)]
    features += [("movie", str(movie)) for movie in sorted(dataset.movies.index)]
    features += [("age", code) for code in AGE_BUCKETS]
    features += [("gender", code) for code in ("F", "M")]
    features += [("occupation", code) for code in OCCUPATIONS]
    if genres:
        names = sorted({genre for gs in dataset.movies["genres"] for genre in gs})
        features += [("genre", name) for name in names]
    return Vocabulary(tuple(features), genres)


@dataclasses.dataclass(frozen=True)
class EncodedRatings:
    """Ratings as fixed-width feature rows for the FM.

    Attributes:
        index: int64 ``[n, width]`` feature rows. Column 0 is the user, 1 the
            movie, 2 to 4 age, gender and occupation, then genre slots.
            Unused genre slots hold ``padding_row`` with value 0.
        value: float32 ``[n, width]`` feature values ``x_i``.
        rating: float32 ``[n]``.
        padding_row: the row id used for empty slots (the vocabulary size).
    """

    index: np.ndarray
    value: np.ndarray
    rating: np.ndarray
    padding_row: int


def movie_feature_table(
    dataset: MovieLensDataset, vocabulary: Vocabulary
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return movie ids and their movie-side feature rows and values.

    Returns:
        ``(movie_ids [m], index [m, 1 + G], value [m, 1 + G])``, where G is the
        maximum number of genres of a movie (0 without genre features) and
        genres get ``x = 1 / number of genres``.
    """
    rows = vocabulary.rows
    movie_ids = np.array(sorted(dataset.movies.index), dtype=np.int64)
    padding = vocabulary.size
    genre_lists = dataset.movies["genres"].reindex(movie_ids).tolist()
    width = max((len(gs) for gs in genre_lists), default=0) if vocabulary.genres else 0
    index = np.full((len(movie_ids), 1 + width), padding, dtype=np.int64)
    value = np.zeros((len(movie_ids), 1 + width), dtype=np.float32)
    index[:, 0] = [rows[("movie", str(m))] for m in movie_ids]
    value[:, 0] = 1.0
    if width:
        for position, genres in enumerate(genre_lists):
            for slot, genre in enumerate(genres):
                index[position, 1 + slot] = rows[("genre", genre)]
                value[position, 1 + slot] = 1.0 / len(genres)
    return movie_ids, index, value


def user_feature_table(
    users: pd.DataFrame, vocabulary: Vocabulary, *, include_user: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return user ids and their user-side rows ``[u, 4]`` and values.

    With ``include_user=False`` (cold start) the user slot contains the padding
    row with value 0, so only age, gender and occupation count.
    """
    rows = vocabulary.rows
    user_ids = users.index.to_numpy(dtype=np.int64)
    index = np.empty((len(user_ids), 4), dtype=np.int64)
    value = np.ones((len(user_ids), 4), dtype=np.float32)
    if include_user:
        index[:, 0] = [rows[("user", str(u))] for u in user_ids]
    else:
        index[:, 0] = vocabulary.size
        value[:, 0] = 0.0
    for column, feature_type in enumerate(("age", "gender", "occupation"), start=1):
        index[:, column] = [rows[(feature_type, v)] for v in users[feature_type]]
    return user_ids, index, value


def encode_ratings(
    dataset: MovieLensDataset,
    vocabulary: Vocabulary,
    ratings: pd.DataFrame | None = None,
    *,
    include_user: bool = True,
) -> EncodedRatings:
    """Encode ratings (all of ``dataset`` by default) as feature rows.

    Users come from ``dataset.users`` and movies from ``dataset.movies``.
    """
    ratings = dataset.ratings if ratings is None else ratings
    user_ids, user_index, user_value = user_feature_table(
        dataset.users, vocabulary, include_user=include_user
    )
    movie_ids, movie_index, movie_value = movie_feature_table(dataset, vocabulary)
    user_pos = _positions(user_ids, ratings["user"].to_numpy(), "user")
    movie_pos = _positions(movie_ids, ratings["movie"].to_numpy(), "movie")
    index = np.concatenate(
        [
            user_index[user_pos, :1],
            movie_index[movie_pos, :1],
            user_index[user_pos, 1:],
            movie_index[movie_pos, 1:],
        ],
        axis=1,
    )
    value = np.concatenate(
        [
            user_value[user_pos, :1],
            movie_value[movie_pos, :1],
            user_value[user_pos, 1:],
            movie_value[movie_pos, 1:],
        ],
        axis=1,
    )
    rating = ratings["rating"].to_numpy(dtype=np.float32)
    return EncodedRatings(index, value, rating, vocabulary.size)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(sorted_ids, kind="stable")
    found = np.searchsorted(sorted_ids, ids, sorter=order)
    found = np.clip(found, 0, len(sorted_ids) - 1)
    positions = order[found]
    missing = sorted_ids[positions] != ids
    if missing.any():
        raise DataError(f"ratings reference unknown {what} {ids[missing][0]}")
    return positions


def vocabulary_document(
    dataset: MovieLensDataset, vocabulary: Vocabulary
) -> dict[str, Any]:
    """Build the ``vocabulary.json`` document of docs/model-format.md."""
    movies = {
        str(movie): {"title": row.title, "genres": list(row.genres)}
        for movie, row in dataset.movies.sort_index().iterrows()
    }
    users = {
        str(user): {
            "age": row.age,
            "gender": row.gender,
            "occupation": row.occupation,
        }
        for user, row in dataset.users.sort_index().iterrows()
    }
    return {
        "format": 1,
        "features": [
            {"feature_type": feature_type, "value": value}
            for feature_type, value in vocabulary.features
        ],
        "movies": movies,
        "users": users,
    }


__all__ = [
    "AGE_BUCKETS",
    "OCCUPATIONS",
    "ML100K_OCCUPATIONS",
    "MovieLensDataset",
    "Vocabulary",
    "EncodedRatings",
    "normalize_profile",
    "load_movielens",
    "detect_dataset",
    "fetch_movielens",
    "extract_archive",
    "build_vocabulary",
    "encode_ratings",
    "movie_feature_table",
    "user_feature_table",
    "vocabulary_document",
]
