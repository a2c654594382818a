import pytest

from discovery.dns.forward import Upstream, from_resolv_conf
from discovery.errors import ValidationError
from discovery.metrics import Metrics, parse_address


@pytest.mark.parametrize("text, host, port", [
    ("192.0.2.53", "192.0.2.53", 53), ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("2001:db8::53", "2001:db8::53", 53), ("[2001:db8::53]:5353", "2001:db8::53", 5353),
])
def test_upstream_forms(text, host, port):
    upstream = Upstream.parse(text)
    assert (upstream.host, upstream.port) == (host, port)


@pytest.mark.parametrize("text", ["dns.example", "1.2.3.4:0", "1.2.3.4:99999", "[::1]:x"])
def test_bad_upstreams_say_what_to_write(text):
    with pytest.raises(ValidationError, match="upstream"):
        Upstream.parse(text)


def test_resolv_conf_nameservers_in_order_without_ourselves(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 127.0.0.11\nnameserver 192.0.2.1\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:0\nnameserver 192.0.2.2\n")
    assert [str(u) for u in from_resolv_conf(conf)] == ["192.0.2.1:53", "[fe80::1]:53", "192.0.2.2:53"]
    assert from_resolv_conf(tmp_path / "missing") == []


def test_metrics_render_in_prometheus_text_format():
    metrics = Metrics()
    counter = metrics.counter("x_total", "Things.", ("kind",))
    counter.inc("a")
    counter.inc("a", amount=2)
    counter.inc('q"uote')
    metrics.gauge("x_level", "Level.", lambda: 1.5)
    histogram = metrics.histogram("x_seconds", "Time.", buckets=(0.1, 1.0))
    histogram.observe(0.05)
    histogram.observe(0.5)
    folded = []
    metrics.on_collect(lambda: folded.append(1))
    text = metrics.render()
    assert folded == [1]
    assert '# TYPE x_total counter\nx_total{kind="a"} 3\nx_total{kind="q\\"uote"} 1\n' in text
    assert "x_level 1.5\n" in text
    assert 'x_seconds_bucket{le="0.1"} 1\nx_seconds_bucket{le="1"} 2\nx_seconds_bucket{le="+Inf"} 2\n' in text
    assert "x_seconds_sum 0.55\nx_seconds_count 2\n" in text
    with pytest.raises(ValueError):
        metrics.counter("x_total", "again")


def test_metrics_address_parsing():
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:9253") == ("::1", 9253)
    with pytest.raises(ValueError, match="127.0.0.1:9253"):
        parse_address("localhost")
