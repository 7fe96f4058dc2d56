"""A parity report as JUnit XML: one testsuite per report, one testcase per layer.

A testcase's `time` is the layer's measured wall time (LayerRecord.seconds: its share of the passes,
see report.LapClock); where the report carries none (older JSON reports, dump comparisons) the
attribute is left out rather than written as a false 0.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .render_text import fmt_metric, json_text
from .report import MODES, Report

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(s) -> str:
    """Text safe for XML 1.0 (ElementTree escapes <>&\" but passes control characters through)."""
    return _XML_BAD.sub("?", str(s))


def _time(seconds: float) -> str:
    return f"{seconds:.6f}"


def junit_xml(report: Report) -> bytes:
    """One testsuite per report, one testcase per layer; a failing layer carries a <failure> whose
    message names each metric that broke and in which mode."""
    c = report.counts()
    x = xml_text
    suite_name = f"sdport.parity.{report.component}.{report.dtype}"
    timed = [l.seconds for l in report.layers if l.seconds is not None]
    total = {"time": _time(sum(timed))} if report.layers and len(timed) == len(report.layers) else {}
    root = ET.Element("testsuites", name="sdport parity", tests=str(c["layers"]),
                      failures=str(c["fail"]), errors="0", **total)
    suite = ET.SubElement(root, "testsuite", name=x(suite_name), tests=str(c["layers"]),
                          failures=str(c["fail"]), errors="0", skipped="0", **total,
                          timestamp=x(report.created))
    props = ET.SubElement(suite, "properties")
    cul = report.culprit
    for k, v in [("component", report.component), ("dtype", report.dtype),
                 ("device", report.device), ("modes", "+".join(report.modes)),
                 ("culprit", "none" if cul is None else cul.line())] + \
            [(f"inputs.{k}", json_text(v))
             for k, v in report.inputs.items()] + \
            [(f"versions.{k}", v) for k, v in report.versions.items()]:
        ET.SubElement(props, "property", name=x(k), value=x(v))
    for l in report.layers:
        tc = ET.SubElement(suite, "testcase", classname=x(suite_name), name=x(f"{l.index:04d} {l.native}"),
                           **({} if l.seconds is None else {"time": _time(l.seconds)}))
        detail = "\n".join(
            f"{m}: " + ", ".join(f"{k}={fmt_metric(k, v)}" for k, v in l.metrics[m].items())
            for m in MODES if m in l.metrics)
        if l.status == "fail":
            msg = "; ".join(f"{m}: {', '.join(f)}" for m, f in l.failures.items() if f)
            fail = ET.SubElement(tc, "failure", message=x(msg), type="ToleranceExceeded")
            fail.text = x(f"{report.candidate} {l.native} vs reference {l.reference} ({l.kind}, shape "
                          f"{list(l.shape)})\n{detail}")
        out = ET.SubElement(tc, "system-out")
        out.text = x(f"reference {l.reference}; kind {l.kind}; shape {list(l.shape)}\n{detail}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(report: Report, path) -> None:
    Path(path).write_bytes(junit_xml(report))
