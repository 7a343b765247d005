#!/usr/bin/env python3
"""Regenerates spec/rules.md from protocol/src/rule.rs and the definitions in spec/*.md.

Run after adding a rule to rule.rs and defining it (as a bold bracketed id) in a spec file;
protocol/tests/spec_coverage.rs checks that the index is current.
"""
import glob
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
rules = re.findall(r'^\s+(\w+) = "([A-Z0-9-]+)", "((?:[^"\\]|\\.)*)";',
                   open(os.path.join(ROOT, 'protocol/src/rule.rs')).read(), re.M)
where = {}
for f in glob.glob(os.path.join(ROOT, 'spec/*.md')):
    for m in re.finditer(r'\*\*\[([A-Z0-9-]+)\]\*\*', open(f).read()):
        where[m.group(1)] = os.path.basename(f)
out = [
    '# Index of rules', '',
    'Every rule id of this specification, in the order of `protocol/src/rule.rs`, with the file that',
    'defines it and a one-line summary. The definition in the named file is normative; the summary',
    'is not. The same summaries are what `Rule::summary()` returns, so error messages and this index',
    'read alike.', '',
    '| id | defined in | summary |', '|---|---|---|',
]
for _, rid, summary in rules:
    f = where.get(rid, 'UNDEFINED')
    summary = summary.replace('\\"', '"').replace('|', '\\|')
    out.append(f'| [{rid}] | [{f}]({f}) | {summary} |')
open(os.path.join(ROOT, 'spec/rules.md'), 'w').write('\n'.join(out) + '\n')
print(f'{len(rules)} rules written to spec/rules.md')
