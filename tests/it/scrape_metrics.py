"""Parses a portres metrics exposition with the Prometheus project's own Python parsers.

Usage: scrape_metrics.py URL|-   (- reads the text on standard input)
Prints JSON: {"status": HTTP status or null, "content_type": ..., "families": {name: {"type":
..., "samples": [[sample name, labels, value], ...]}}}. Both parsers must accept the text: the
OpenMetrics one (strict: what Prometheus scrapes) and the classic text-format one (what
node_exporter's textfile collector reads).
"""
import json
import sys
import urllib.error
import urllib.request

from prometheus_client.openmetrics import parser as openmetrics
from prometheus_client import parser as classic

arg = sys.argv[1]
status = content_type = None
if arg == "-":
    text = sys.stdin.read()
else:
    with urllib.request.urlopen(arg, timeout=10) as r:
        status = r.status
        content_type = r.headers.get("content-type")
        text = r.read().decode()

families = {}
for f in openmetrics.text_string_to_metric_families(text):
    families[f.name] = {
        "type": f.type,
        "samples": [[s.name, s.labels, s.value] for s in f.samples],
    }
classic_names = [f.name for f in classic.text_string_to_metric_families(text)]
print(json.dumps({"status": status, "content_type": content_type, "families": families,
                  "classic": classic_names}))
