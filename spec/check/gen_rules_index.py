#!/usr/bin/env python3
"""Regenerates spec/rules.md from protocol/src/rule.rs and the definitions in spec/*.md.

Run after adding a rule to rule.rs and defining it (as a bold bracketed id) in a spec file;
protocol/tests/spec_coverage.rs checks that the index is current. It ends with the conformance
traceability table (rule -> synthetic cases, from conformance/vectors/synthetic/index.json: run
after `qmig conformance --generate`); conformance/tests/synthetic.rs checks that table.
"""
import glob
import json
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
# Traceability: each rule -> its synthetic conformance cases (conformance/vectors/synthetic,
# regenerated with `qmig conformance --generate`), or where it is checked instead.
index = json.load(open(os.path.join(ROOT, 'conformance/vectors/synthetic/index.json')))
out += [
    '', '## Conformance traceability', '',
    'Each rule with its synthetic conformance cases (`conformance/vectors/synthetic/<case>`, run by',
    '`qmig conformance`: `decode/synthetic/<case>`, and `replay-dst[...]/synthetic/<case>` or, for',
    'the `source-*` cases, `replay-src[...]/synthetic/<case>`). A valid case listed in parentheses',
    'exercises the rule without being about it. A rule without a pair of cases says where it is',
    'checked instead (`ELSEWHERE` in conformance/src/synth/cases.rs). The invalid column also lists',
    '`acceptable-*` cases: they break the rule where only a verifier looks (the VM description after',
    'EOF), so a destination may complete them. An invalid case in parentheses breaks another rule at a',
    'place where this state rule decides how the destination must end (its `reaction`: fail before',
    'POSTCOPY_RUN, pause after it or in postcopy-recover), which the replay and the decode check require.',
    'For a destination behaviour rule no input can break, the invalid column names the broken destination',
    '(`--dst broken-KIND:qmig`: its return path altered against that rule) that must fail the cases given;',
    'for a source behaviour rule, the broken source (`--src broken-KIND:qmig`: the stream the runner checks',
    'altered against that rule).', '',
    '| rule | valid cases | invalid cases | checked elsewhere |', '|---|---|---|---|',
]
elsewhere = {e['rule']: e['checked_by'] for e in index['not_generated']}
for _, rid, _ in rules:
    valid = [c['name'] for c in index['cases'] if c['class'] == 'valid' and c['rule'] == rid]
    ex = [c['name'] for c in index['cases']
          if c['class'] == 'valid' and c['rule'] != rid and rid in c.get('exercises', [])]
    invalid = [c['name'] for c in index['cases'] if c['class'] in ('invalid', 'acceptable') and c['rule'] == rid]
    cell = ', '.join(f'`{n}`' for n in valid)
    if ex:
        shown = ex[:3]
        more = f' +{len(ex) - len(shown)} more' if len(ex) > len(shown) else ''
        cell += (' ' if cell else '') + '(' + ', '.join(f'`{n}`' for n in shown) + more + ')'
    react = [c['name'] for c in index['cases'] if c.get('reaction') == rid]
    icell = ', '.join(f'`{n}`' for n in invalid)
    if react:
        shown = react[:3]
        more = f' +{len(react) - len(shown)} more' if len(react) > len(shown) else ''
        icell += (' ' if icell else '') + '(' + ', '.join(f'`{n}`' for n in shown) + more + ')'
    for b in index.get('broken_targets', []):
        if b['rule'] == rid:
            flag = '--src' if b.get('side') == 'source' else '--dst'
            icell += (' ' if icell else '') + f"`{flag} {b['target']}` fails `{b['fails']}`"
    els = elsewhere.get(rid, '').replace('|', '\\|')
    out.append(f"| {rid} | {cell or '-'} | {icell or '-'} | {els or '-'} |")
open(os.path.join(ROOT, 'spec/rules.md'), 'w').write('\n'.join(out) + '\n')
print(f'{len(rules)} rules written to spec/rules.md')
