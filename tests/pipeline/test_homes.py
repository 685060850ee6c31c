"""The home rule of ADR 0001 against the real broker: a key produced with headwater's producer
settings lands on exactly the partition ``Homes`` computes, so correctly keyed events need no hop."""

from __future__ import annotations

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from processors.identity.homes import Homes


def test_murmur2_producers_put_each_distinct_id_on_its_home(kafka_bootstrap: str, test_env) -> None:
    topic = f"{test_env['HEADWATER_TOPIC_PREFIX']}homes"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 7, 1)])[topic].result(30)
    homes = Homes({1: "phc_test"}, 7)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    placed: dict[str, int] = {}
    dids = [f"user-{i}" for i in range(200)] + ["", "é", "a b", "x" * 300]
    for did in dids:
        producer.produce(topic, b"{}", f"phc_test:{did}".encode(),
                         on_delivery=lambda err, msg, did=did: placed.__setitem__(did, msg.partition()))
    assert producer.flush(30) == 0
    assert placed == {did: homes.of(1, did) for did in dids}
    assert len(set(placed.values())) == 7
