"""MovieLens parsing, error reporting, mappings, normalization and download."""

from __future__ import annotations

import gzip
import lzma
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from esfm.data import (
    AGE_BUCKETS,
    ML100K_OCCUPATIONS,
    OCCUPATIONS,
    age_bucket,
    build_vocabulary,
    detect_dataset,
    encode_ratings,
    extract_archive,
    fetch_movielens,
    load_movielens,
    movie_feature_table,
    normalize_profile,
    resolve_dataset_name,
)
from esfm.errors import DataError, QueryError

USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "73::Mis\xe9rables, Les (1995)::Drama|Musical\n"
)
RATINGS = "1::1::5::978300760\n1::2::3::978302109\n2::73::4::978301968\n3::1::2::1\n"


def write_ml1m(
    folder: Path,
    *,
    users: str = USERS,
    movies: str = MOVIES,
    ratings: str = RATINGS,
    ratings_name: str = "ratings.dat",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_bytes(users.encode("latin-1"))
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    payload = ratings.encode("latin-1")
    if ratings_name.endswith(".xz"):
        payload = lzma.compress(payload)
    elif ratings_name.endswith(".gz"):
        payload = gzip.compress(payload)
    (folder / ratings_name).write_bytes(payload)
    return folder


U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|15|M|student|32067\n"
U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Caf\xe9 (1995)|01-Jan-1995||http://y|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)
U_DATA = "1\t1\t3\t881250949\n2\t2\t5\t891717742\n3\t1\t1\t878887116\n"


def write_ml100k(
    folder: Path, *, users: str = U_USER, items: str = U_ITEM, data: str = U_DATA
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.user").write_text(users, encoding="latin-1")
    (folder / "u.item").write_bytes(items.encode("latin-1"))
    (folder / "u.data").write_text(data, encoding="latin-1")
    (folder / "u.occupation").write_text("\n".join(ML100K_OCCUPATIONS) + "\n")
    return folder


# -- well-formed files ------------------------------------------------------


def test_ml1m_small_files_load(tmp_path):
    dataset = load_movielens(write_ml1m(tmp_path))
    assert dataset.name == "ml-1m"
    assert list(dataset.ratings.columns) == ["user", "movie", "rating"]
    assert dataset.ratings["rating"].tolist() == [5.0, 3.0, 4.0, 2.0]
    assert dataset.users.loc[1].tolist() == ["1", "F", "10"]
    assert dataset.movies.loc[73, "title"] == "Misérables, Les (1995)"
    assert dataset.movies.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]


@pytest.mark.parametrize("name", ["ratings.dat.xz", "ratings.dat.gz"])
def test_ml1m_compressed_ratings(tmp_path, name):
    dataset = load_movielens(write_ml1m(tmp_path, ratings_name=name))
    assert len(dataset.ratings) == 4


def test_ml1m_utf8_movies_accepted(tmp_path):
    folder = write_ml1m(tmp_path)
    (folder / "movies.dat").write_bytes(MOVIES.encode("utf-8"))
    dataset = load_movielens(folder)
    assert dataset.movies.loc[73, "title"] == "Misérables, Les (1995)"


def test_ml100k_small_files_load(tmp_path):
    dataset = load_movielens(write_ml100k(tmp_path))
    assert dataset.name == "ml-100k"
    assert dataset.users.loc[1].tolist() == ["18", "M", "17"]
    assert dataset.users.loc[2].tolist() == ["50", "F", "0"]
    # A student under 18 is a K-12 student in the MovieLens 1M codes.
    assert dataset.users.loc[3, "occupation"] == "10"
    assert dataset.movies.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert dataset.movies.loc[2, "genres"] == []
    assert dataset.movies.loc[2, "title"] == "Café (1995)"


def test_ml100k_occupation_codes_accepted(tmp_path):
    folder = write_ml100k(tmp_path, users=U_USER.replace("technician", "12"))
    assert load_movielens(folder).users.loc[1, "occupation"] == "12"


def test_detect_dataset_folders(tmp_path):
    assert detect_dataset(write_ml1m(tmp_path / "ml-1m")) == "ml-1m"
    assert detect_dataset(write_ml100k(tmp_path / "ml-100k")) == "ml-100k"
    with pytest.raises(DataError, match="subfolder ml-1m"):
        detect_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_dataset(tmp_path / "missing")


# -- error cases ------------------------------------------------------------


def load_error(folder: Path) -> str:
    with pytest.raises(DataError) as caught:
        load_movielens(folder)
    return str(caught.value)


def test_missing_movies_file(tmp_path):
    folder = write_ml1m(tmp_path)
    (folder / "movies.dat").unlink()
    message = load_error(folder)
    assert "missing file movies.dat" in message
    assert "esfm data fetch" in message


def test_malformed_ratings_line(tmp_path):
    ratings = RATINGS.replace("1::2::3::978302109", "1::2::three::978302109")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "malformed line 2" in message
    assert "ratings.dat" in message
    assert "'three'" in message
    assert "1::2::three::978302109" in message
    assert "fix or delete line 2" in message


def test_too_many_fields(tmp_path):
    ratings = RATINGS.replace("2::73::4::978301968", "2::73::4::978301968::9")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "malformed line 3" in message
    assert "5 fields, expected 4" in message


def test_too_few_fields(tmp_path):
    ratings = RATINGS.replace("3::1::2::1", "3::1")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "malformed line 4" in message
    assert "too few fields" in message


def test_blank_line_reported(tmp_path):
    ratings = RATINGS.replace("1::2::3::978302109\n", "1::2::3::978302109\n\n")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "malformed line 3" in message
    assert "empty line" in message


def test_wrong_separator(tmp_path):
    ratings = RATINGS.replace("::", "\t")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "uses '\\t' as separator, expected '::'" in message


def test_wrong_encoding_utf16(tmp_path):
    folder = write_ml1m(tmp_path)
    (folder / "movies.dat").write_bytes(MOVIES.encode("utf-16"))
    message = load_error(folder)
    assert "NUL bytes" in message
    assert "movies.dat" in message


def test_rating_outside_range(tmp_path):
    ratings = RATINGS.replace("2::73::4::", "2::73::6::")
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "malformed line 3" in message
    assert "rating 6 is outside 1 to 5" in message


def test_rating_zero_rejected(tmp_path):
    ratings = RATINGS.replace("3::1::2::1", "3::1::0::1")
    assert "rating 0 is outside 1 to 5" in load_error(
        write_ml1m(tmp_path, ratings=ratings)
    )


def test_unknown_user(tmp_path):
    ratings = RATINGS + "9::1::4::5\n"
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "line 5" in message
    assert "unknown user 9" in message


def test_unknown_movie(tmp_path):
    ratings = RATINGS + "1::999::4::5\n"
    assert "unknown movie 999" in load_error(write_ml1m(tmp_path, ratings=ratings))


def test_empty_ratings_file(tmp_path):
    message = load_error(write_ml1m(tmp_path, ratings=""))
    assert "is empty" in message
    assert "ratings.dat" in message


def test_duplicate_rating(tmp_path):
    ratings = RATINGS + "1::2::4::978302110\n"
    message = load_error(write_ml1m(tmp_path, ratings=ratings))
    assert "duplicate rating of movie 2 by user 1" in message
    assert "lines 2 and 5" in message


def test_duplicate_user(tmp_path):
    users = USERS + "2::F::18::3::12345\n"
    message = load_error(write_ml1m(tmp_path, users=users))
    assert "duplicate user 2" in message
    assert "lines 2 and 4" in message


def test_invalid_age_bucket_in_users(tmp_path):
    users = USERS.replace("3::M::25::", "3::M::30::")
    message = load_error(write_ml1m(tmp_path, users=users))
    assert "malformed line 3" in message
    assert "invalid age '30'" in message


def test_invalid_gender_in_users(tmp_path):
    users = USERS.replace("1::F::", "1::X::")
    assert "invalid gender 'X'" in load_error(write_ml1m(tmp_path, users=users))


def test_corrupt_xz(tmp_path):
    folder = write_ml1m(tmp_path, ratings_name="ratings.dat.xz")
    path = folder / "ratings.dat.xz"
    path.write_bytes(path.read_bytes()[:20])
    assert "cannot decompress" in load_error(folder)


def test_ml100k_bad_genre_flag(tmp_path):
    items = U_ITEM.replace("|0|0|0|1|1|1|", "|0|0|0|2|1|1|")
    message = load_error(write_ml100k(tmp_path, items=items))
    assert "malformed line 1" in message
    assert "u.item" in message


def test_ml100k_unlisted_occupation(tmp_path):
    users = U_USER.replace("technician", "astronaut")
    message = load_error(write_ml100k(tmp_path, users=users))
    assert "occupation 'astronaut'" in message
    assert "u.user" in message


def test_ml100k_wrong_separator(tmp_path):
    message = load_error(write_ml100k(tmp_path, data=U_DATA.replace("\t", ",")))
    assert "uses ',' as separator, expected '\\t'" in message


# -- mappings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "bucket"),
    [
        (0, "1"),
        (17, "1"),
        (18, "18"),
        (24, "18"),
        (25, "25"),
        (34, "25"),
        (35, "35"),
        (44, "35"),
        (45, "45"),
        (49, "45"),
        (50, "50"),
        (55, "50"),
        (56, "56"),
        (90, "56"),
    ],
)
def test_age_bucket_edges(raw, bucket):
    assert age_bucket(raw) == bucket


def test_ml100k_occupations_map_to_ml1m_codes():
    assert set(ML100K_OCCUPATIONS.values()) <= set(OCCUPATIONS)
    assert ML100K_OCCUPATIONS["programmer"] == "12"
    assert ML100K_OCCUPATIONS["engineer"] == "17"
    assert ML100K_OCCUPATIONS["librarian"] == "0"
    assert ML100K_OCCUPATIONS["healthcare"] == "6"


def test_real_ml100k_loads(ml100k_dir):
    dataset = load_movielens(ml100k_dir)
    assert len(dataset.ratings) == 100_000
    assert len(dataset.users) == 943
    assert len(dataset.movies) == 1682
    assert set(dataset.users["age"]) <= set(AGE_BUCKETS)
    assert set(dataset.users["occupation"]) <= set(OCCUPATIONS)


# -- normalize_profile ------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        ("18", "18"),
        ("18-24", "18"),
        ("56+", "56"),
        ("Under 18", "1"),
        ("under 18", "1"),
        (30, "25"),
        ("30", "25"),
        (1, "1"),
        ("45-49", "45"),
    ],
)
def test_normalize_age_forms(age, bucket):
    assert normalize_profile(age=age) == {"age": bucket}


@pytest.mark.parametrize(
    ("gender", "code"), [("M", "M"), ("f", "F"), ("Male", "M"), ("FEMALE", "F")]
)
def test_normalize_gender_forms(gender, code):
    assert normalize_profile(gender=gender) == {"gender": code}


@pytest.mark.parametrize(
    ("occupation", "code"),
    [
        ("4", "4"),
        (12, "12"),
        ("college/grad student", "4"),
        ("College/Grad Student", "4"),
        ("programmer", "12"),
        ("K-12 student", "10"),
        ("salesman", "14"),
        ("other", "0"),
    ],
)
def test_normalize_occupation_forms(occupation, code):
    assert normalize_profile(occupation=occupation) == {"occupation": code}


def test_normalize_profile_all_fields():
    profile = normalize_profile(age="25-34", gender="m", occupation="writer", user=42)
    assert profile == {"user": "42", "age": "25", "gender": "M", "occupation": "20"}


@pytest.mark.parametrize(
    ("field", "value", "listed"),
    [
        ("age", "old", "18-24"),
        ("age", -3, "18-24"),
        ("age", 200, "18-24"),
        ("gender", "x", "female"),
        ("occupation", "astronaut", "programmer"),
        ("occupation", "21", "programmer"),
        ("user", "abc", "positive integer"),
    ],
)
def test_normalize_profile_invalid(field, value, listed):
    with pytest.raises(QueryError) as caught:
        normalize_profile(**{field: value})
    assert repr(value) in caught.value.message
    assert listed in str(caught.value)


@given(st.integers(min_value=0, max_value=120))
def test_raw_age_and_bucket_agree(raw):
    bucket = normalize_profile(age=raw)["age"]
    assert bucket in AGE_BUCKETS
    # The bucket code read as a raw age lands in the same bucket.
    assert normalize_profile(age=bucket)["age"] == bucket
    assert normalize_profile(age=AGE_BUCKETS[bucket])["age"] == bucket
    assert int(bucket) <= max(raw, 1)


@given(st.sampled_from(sorted(OCCUPATIONS)))
def test_occupation_name_and_code_agree(code):
    name = OCCUPATIONS[code]
    assert normalize_profile(occupation=name.upper())["occupation"] == code
    assert normalize_profile(occupation=int(code))["occupation"] == code


# -- vocabulary and encoding ------------------------------------------------


def test_vocabulary_order_and_genres(synthetic_dataset):
    vocabulary = build_vocabulary(synthetic_dataset, genres=True)
    kinds = [kind for kind, _ in vocabulary.features]
    assert kinds[0] == "user"
    assert kinds.index("movie") == len(synthetic_dataset.users)
    assert kinds[-1] == "genre"
    assert vocabulary.row("gender", "F") == vocabulary.features.index(("gender", "F"))
    with pytest.raises(QueryError, match="unknown age '99'"):
        vocabulary.row("age", "99")


def test_genre_values_are_one_over_count(synthetic_dataset):
    vocabulary = build_vocabulary(synthetic_dataset, genres=True)
    movie_ids, index, value = movie_feature_table(synthetic_dataset, vocabulary)
    for position, movie in enumerate(movie_ids):
        genres = synthetic_dataset.movies.loc[movie, "genres"]
        active = value[position, 1:][value[position, 1:] > 0]
        assert np.allclose(active, 1 / len(genres))
        assert len(active) == len(genres)
        padded = index[position, 1 + len(genres) :]
        assert (padded == vocabulary.size).all()


def test_encode_ratings_columns(synthetic_dataset):
    vocabulary = build_vocabulary(synthetic_dataset, genres=False)
    encoded = encode_ratings(synthetic_dataset, vocabulary)
    first = synthetic_dataset.ratings.iloc[0]
    user = synthetic_dataset.users.loc[int(first["user"])]
    assert encoded.index.shape == (len(synthetic_dataset.ratings), 5)
    assert encoded.index[0, 0] == vocabulary.row("user", str(int(first["user"])))
    assert encoded.index[0, 1] == vocabulary.row("movie", str(int(first["movie"])))
    assert encoded.index[0, 2] == vocabulary.row("age", user["age"])
    assert encoded.index[0, 4] == vocabulary.row("occupation", user["occupation"])
    assert (encoded.value == 1).all()


# -- download archive -------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def test_extract_archive_atomic(tmp_path):
    archive = make_zip(
        tmp_path / "x.zip",
        {
            "ml-1m/users.dat": USERS.encode(),
            "ml-1m/movies.dat": MOVIES.encode("latin-1"),
            "ml-1m/ratings.dat": RATINGS.encode(),
        },
    )
    dest = tmp_path / "dest"
    (dest / "ml-1m").mkdir(parents=True)
    (dest / "ml-1m" / "stale.txt").write_text("old")
    target = extract_archive(
        archive, dest, folder="ml-1m", required=["users.dat", "ratings.dat"]
    )
    assert target == dest / "ml-1m"
    assert not (target / "stale.txt").exists()
    assert len(load_movielens(target).ratings) == 4
    assert sorted(p.name for p in dest.iterdir()) == ["ml-1m"]


def test_extract_rejects_non_zip(tmp_path):
    archive = tmp_path / "x.zip"
    archive.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="is not a zip file"):
        extract_archive(archive, tmp_path / "d", folder="ml-1m", required=[])


def test_extract_rejects_missing_member(tmp_path):
    archive = make_zip(tmp_path / "x.zip", {"ml-1m/users.dat": b"1::F::1::10::1\n"})
    with pytest.raises(DataError, match="lacks ratings.dat"):
        extract_archive(
            archive, tmp_path / "d", folder="ml-1m", required=["ratings.dat"]
        )
    assert not (tmp_path / "d" / "ml-1m").exists()


def test_extract_rejects_unsafe_path(tmp_path):
    archive = make_zip(tmp_path / "x.zip", {"ml-1m/../../evil.txt": b"x"})
    with pytest.raises(DataError, match="unsafe path"):
        extract_archive(archive, tmp_path / "d", folder="ml-1m", required=[])
    assert not (tmp_path / "evil.txt").exists()


def test_extract_rejects_crc_mismatch(tmp_path):
    archive = make_zip(tmp_path / "x.zip", {"ml-1m/users.dat": b"A" * 2000})
    raw = bytearray(archive.read_bytes())
    offset = raw.index(b"A" * 100)
    raw[offset] = ord("B")
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="CRC|corrupt"):
        extract_archive(archive, tmp_path / "d", folder="ml-1m", required=[])


def test_resolve_dataset_names():
    assert resolve_dataset_name("movielens-1m") == "ml-1m"
    assert resolve_dataset_name("ML-100K") == "ml-100k"
    with pytest.raises(DataError, match="unknown dataset 'ml-20m'"):
        resolve_dataset_name("ml-20m")


def test_fetch_from_file_url(tmp_path):
    # A file:// URL runs the download loop without any network access.
    archive = make_zip(
        tmp_path / "ml-100k.zip",
        {
            "ml-100k/u.data": U_DATA.encode(),
            "ml-100k/u.user": U_USER.encode(),
            "ml-100k/u.item": U_ITEM.encode("latin-1"),
        },
    )
    progress = []
    target = fetch_movielens(
        "movielens-100k",
        tmp_path / "dest",
        lambda received, total: progress.append((received, total)),
        url=archive.as_uri(),
    )
    assert target == tmp_path / "dest" / "ml-100k"
    assert len(load_movielens(target).ratings) == 3
    assert progress[-1][0] == archive.stat().st_size
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["ml-100k"]


def test_fetch_rejects_html_page(tmp_path):
    page = tmp_path / "error.html"
    page.write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(DataError, match="is not a zip file"):
        fetch_movielens("ml-1m", tmp_path / "dest", url=page.as_uri())
    assert not (tmp_path / "dest").exists()


def test_crlf_line_endings(tmp_path):
    folder = write_ml1m(
        tmp_path,
        movies=MOVIES.replace("\n", "\r\n"),
        ratings=RATINGS.replace("\n", "\r\n"),
    )
    dataset = load_movielens(folder)
    assert dataset.movies.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert len(dataset.ratings) == 4


def test_failed_fetch_leaves_no_folder(tmp_path):
    dest = tmp_path / "data"
    missing = (tmp_path / "no-such.zip").as_uri()
    with pytest.raises(DataError, match="download of .* failed"):
        fetch_movielens("movielens-1m", dest, url=missing)
    assert not dest.exists()


def test_interrupted_parse_is_not_retried(tmp_path, monkeypatch):
    # A fake, because a test cannot time a real SIGINT to land inside pandas'
    # C reader: read_csv fails as it does then, with the interrupt turned
    # into a ParserError.
    import esfm.data as data_module

    folder = write_ml1m(tmp_path / "ml-1m")

    def interrupted(*args, **kwargs):
        raise data_module.pd.errors.ParserError(
            "Calling read(nbytes) on source failed. Try engine='python'."
        )

    monkeypatch.setattr(data_module.pd, "read_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_movielens(folder)
