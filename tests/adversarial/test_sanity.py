"""The baseline the attacks are measured against: legitimate raw calls pass."""
from tests.adversarial.conftest import call


def test_allowed_call_reaches_upstream(adv, upstream):
    r = adv.post(call("get_customer", {"id": 1}))
    assert r.status_code == 200, r.text
    assert "result" in r.text and "[MASKED:ssn]" in r.text
    assert '"get_customer"' in upstream.bodies()


def test_allowed_read_sql(adv, upstream):
    r = adv.post(call("query_sql", {"sql": "SELECT count(*) AS n FROM customers"}))
    assert r.status_code == 200 and "result" in r.text, r.text
