"""The MQTT half of the wire contract (docs/wire-format.md), named once for the meters and the consumer.

A meter publishes each reading to ``smartgas/meters/{meter_id}/reading`` (QoS 1), the payload exactly the
CoAP PUT's body, its format in the MQTT 5 Content Type property (JSON when absent). The consumer answers
on the MQTT 5 Response Topic the meter gave, which must be ``smartgas/meters/{meter_id}/answer`` (the one
topic the broker's ACL lets the meter read), with the reading's Correlation Data; without one, it
publishes refusals only, to that same topic.
"""

from __future__ import annotations

TOPIC_PREFIX = "smartgas/meters/"
READING_SUFFIX = "/reading"
ANSWER_SUFFIX = "/answer"
#: What the consumer subscribes to (``$share/{group}/`` in front of it for a shared subscription).
READING_FILTER = TOPIC_PREFIX + "+" + READING_SUFFIX
#: What the consumer publishes answers to (the consumer's write permission in the broker's ACL).
ANSWER_FILTER = TOPIC_PREFIX + "+" + ANSWER_SUFFIX

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CBOR = "application/cbor"

#: The QoS of readings and answers: at least once, acknowledged (PUBACK) by whoever took it over.
QOS = 1


def reading_topic(meter_id: str) -> str:
    return f"{TOPIC_PREFIX}{meter_id}{READING_SUFFIX}"


def answer_topic(meter_id: str) -> str:
    return f"{TOPIC_PREFIX}{meter_id}{ANSWER_SUFFIX}"


def meter_id_of_reading_topic(topic: str) -> str | None:
    """The meter id of a reading topic (one topic level, not checked against the meter id rule), or None."""
    if not (topic.startswith(TOPIC_PREFIX) and topic.endswith(READING_SUFFIX)):
        return None
    meter_id = topic[len(TOPIC_PREFIX) : -len(READING_SUFFIX)]
    if not meter_id or "/" in meter_id:
        return None
    return meter_id


def shared_filter(group: str | None) -> str:
    """The consumer's subscription: plain, or through the MQTT 5 shared subscription ``group``."""
    return f"$share/{group}/{READING_FILTER}" if group else READING_FILTER
