// The lmq playground page: an editor highlighted with the lmq TextMate grammar (the VS Code
// extension's, through vscode-textmate + vscode-oniguruma), Run / Stop, the prompt streamed
// from the run's trace events (observability.md), each value's token trace, the compiled
// program with each hole's GBNF, and errors at their line.
'use strict';

const $ = (id) => document.getElementById(id);
const source = $('source');
const highlight = $('highlight');
const gutter = $('gutter');

// ---------------------------------------------------------------------------------------
// Highlighting: the same grammar files and engine as the VS Code extension.

const GRAMMARS = {
  'source.lmq': '/static/grammars/lmq.tmLanguage.json',
  'source.python': '/static/grammars/python.tmLanguage.json',
};
// innermost scope first; the first rule a scope matches gives the token its class
const SCOPE_CLASSES = [
  [/^variable\.other\.hole\.lmq/, 'tok-hole'],
  [/^punctuation\.definition\.hole/, 'tok-hole-punct'],
  [/^(entity\.name\.function|punctuation\.definition)\.decorator\.lmq/, 'tok-decorator'],
  [/^(entity\.name\.tag\.chat|punctuation\.definition\.tag)/, 'tok-chat'],
  [/^punctuation\.section\.interpolation/, 'tok-interp-punct'],
  [/^keyword\.(control\.clause|other\.decoder)\.lmq/, 'tok-clause'],
  [/^keyword\.other\.marker\.lmq/, 'tok-clause'],
  [/^support\.function\.constraint\.lmq/, 'tok-constraint'],
  [/^constant\.character\.escape/, 'tok-escape'],
  [/^comment/, 'tok-comment'],
  [/^string\.regexp/, 'tok-regex'],
  [/\.prompt\.lmq$/, 'tok-prompt'],
  [/^string/, 'tok-string'],
  [/^(keyword|storage)/, 'tok-keyword'],
  [/^constant\.(numeric|language)/, 'tok-number'],
  [/^support\.(function\.builtin|type)/, 'tok-builtin'],
  [/^entity\.name\.(function|type)/, 'tok-function'],
  [/^meta\.hole\.annotation\.lmq/, 'tok-annotation'],
  [/^meta\.interpolation\.lmq/, 'tok-interp'],
];

let grammars = null;   // {lmq, python} once the engine has loaded

async function loadGrammars() {
  const wasm = await (await fetch('/static/vendor/onig.wasm')).arrayBuffer();
  await onig.loadWASM(wasm);
  const registry = new vscodetextmate.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (patterns) => new onig.OnigScanner(patterns),
      createOnigString: (text) => new onig.OnigString(text),
    }),
    loadGrammar: async (scope) => {
      const url = GRAMMARS[scope];
      return url ? vscodetextmate.parseRawGrammar(await (await fetch(url)).text(), url) : null;
    },
  });
  grammars = {
    lmq: await registry.loadGrammar('source.lmq'),
    python: await registry.loadGrammar('source.python'),
  };
}

function scopeClass(scopes) {
  for (let i = scopes.length - 1; i >= 0; i--) {
    for (const [pattern, cls] of SCOPE_CLASSES) {
      if (pattern.test(scopes[i])) return cls;
    }
  }
  return '';
}

// Variables keep one colour each, in the editor and in the prompt.
const variableColours = new Map();
function variableClass(name) {
  if (!variableColours.has(name)) variableColours.set(name, variableColours.size % 8);
  return `var-${variableColours.get(name)}`;
}

function escapeHtml(text) {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

// Lines of `text` as HTML: [[html of line 1], ...]; `mark` = {line, column} underlines a character.
function highlightLines(text, grammar, mark) {
  const lines = text.split('\n');
  let state = vscodetextmate.INITIAL;
  return lines.map((line, index) => {
    const number = index + 1;
    if (!grammar) return escapeHtml(line) || ' ';
    const result = grammar.tokenizeLine(line, state);
    state = result.ruleStack;
    let html = '';
    for (const token of result.tokens) {
      const start = token.startIndex;
      const end = Math.min(token.endIndex, line.length);
      let cls = scopeClass(token.scopes);
      if (cls === 'tok-hole') cls += ' ' + variableClass(line.slice(start, end));
      html += piece(line, start, end, cls, mark && mark.line === number ? mark.column - 1 : -1);
    }
    return html || ' ';
  });
}

function piece(line, start, end, cls, markAt) {
  const wrap = (text) => (cls ? `<span class="${cls}">${escapeHtml(text)}</span>` : escapeHtml(text));
  if (markAt < start || markAt >= end) {
    return markAt >= line.length && end === line.length && markAt >= start
      ? wrap(line.slice(start, end)) + '<span class="err-char"> </span>' : wrap(line.slice(start, end));
  }
  return wrap(line.slice(start, markAt)) + `<span class="err-char">${wrap(line.slice(markAt, markAt + 1))}</span>`
    + wrap(line.slice(markAt + 1, end));
}

// ---------------------------------------------------------------------------------------
// The editor: a transparent textarea over its highlighted copy, both grown to the text.

let errorMark = null;     // {line, column, message} of the error shown in the editor

function renderEditor() {
  const text = source.value;
  const lines = highlightLines(text, grammars && grammars.lmq, errorMark);
  highlight.innerHTML = lines.map((html, i) =>
    `<div class="line${errorMark && errorMark.line === i + 1 ? ' error' : ''}" data-line="${i + 1}">${html}</div>`).join('');
  gutter.innerHTML = lines.map((_, i) => {
    const bad = errorMark && errorMark.line === i + 1;
    return `<div data-line="${i + 1}"${bad ? ` class="error" title="${escapeHtml(errorMark.message)}"` : ''}>${i + 1}</div>`;
  }).join('');
}

function showError(event) {
  const box = $('error');
  if (!event) {
    box.hidden = true;
    box.textContent = '';
    errorMark = null;
  } else {
    const placed = event.line && !event.message.includes(`line ${event.line}`);   // a syntax error says it
    const where = placed ? `line ${event.line}${event.column ? `, column ${event.column}` : ''}: ` : '';
    box.hidden = false;
    box.textContent = `${event.type}: ${where}${event.message}`;
    errorMark = event.line ? { line: event.line, column: event.column || 0, message: event.message } : null;
  }
  renderEditor();
}

let compileTimer = null;
source.addEventListener('input', () => {
  renderEditor();
  clearTimeout(compileTimer);
  compileTimer = setTimeout(compile, 350);
});
source.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    run();
  } else if (e.key === 'Tab' && !e.shiftKey) {
    e.preventDefault();
    document.execCommand('insertText', false, '    ');
  } else if (e.key === 'Enter') {         // keep the indentation, one more after a ':'
    const before = source.value.slice(0, source.selectionStart);
    const line = before.slice(before.lastIndexOf('\n') + 1);
    let indent = line.match(/^\s*/)[0];
    if (/:\s*$/.test(line) || /^(argmax|sample|beam|beam_search|best_k)\b.*\)?\s*$/.test(line)
        || /^\s*(from|where|distribution)\s*$/i.test(line)) indent += '    ';
    if (indent) {
      e.preventDefault();
      document.execCommand('insertText', false, '\n' + indent);
    }
  }
});

function setSource(text) {
  source.value = text;
  source.focus();
  source.setSelectionRange(0, 0);
  renderEditor();
  compile();
}

// ---------------------------------------------------------------------------------------
// Compiled view: the generated program and each hole's grammar (`lmq compile`).

async function post(path, body) {
  return fetch(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
}

async function compile() {
  const text = source.value;
  const view = await (await post('/api/compile', { source: text })).json();
  if (text !== source.value) return;        // edited meanwhile: a newer compile follows
  const panel = $('compiled');
  if (view.error) {
    showError(view.error);
    panel.innerHTML = `<p class="hint">The query does not compile: ${escapeHtml(view.error.message.split('\n')[0])}</p>`;
    return;
  }
  showError(null);
  const python = highlightLines(view.python, grammars && grammars.python, null).join('\n');
  panel.innerHTML = `<h3>Parameters: ${escapeHtml(view.parameters.join(', ') || '(none)')}`
    + `${view.decoder ? ` · decoder ${escapeHtml(view.decoder)}` : ''}</h3>`
    + view.holes.map((hole) => `<h3>hole ${hole.index}: <span class="tok-hole ${variableClass(hole.name)}">${escapeHtml(hole.name)}</span>`
      + ` (line ${hole.line}) where ${escapeHtml(hole.where || '(none)')}</h3>`
      + `<pre class="code-block grammar">${escapeHtml(hole.grammar)}</pre>`).join('')
    + `<h3>Generated program</h3><pre class="code-block python">${python}</pre>`;
}

// ---------------------------------------------------------------------------------------
// Runs: the trace events, streamed as JSON lines.

let currentRun = null;     // {id, controller}
const holes = new Map();   // key → {hole event, tokens: [token events], value event, element}
let selectedKey = null;

function setRunning(running, status) {
  $('run').disabled = running;
  $('stop').disabled = !running;
  $('status').textContent = status;
}

function branchPane(branch) {
  const prompt = $('prompt');
  let pane = prompt.querySelector(`.branch[data-branch="${branch}"]`);
  if (!pane) {
    pane = document.createElement('div');
    pane.className = 'branch';
    pane.dataset.branch = branch;
    pane.stack = [pane];           // open nested-query containers, innermost last
    pane.role = null;
    prompt.appendChild(pane);
    if (prompt.children.length > 1) {
      for (const p of prompt.children) {
        if (!p.querySelector(':scope > .branch-label')) {
          const label = document.createElement('span');
          label.className = 'branch-label';
          label.textContent = `branch ${p.dataset.branch}`;
          p.prepend(label);
        }
      }
    }
  }
  return pane;
}

const open = (pane) => pane.stack[pane.stack.length - 1];

function append(parent, cls, text) {
  const span = document.createElement('span');
  if (cls) span.className = cls;
  span.textContent = text;
  parent.appendChild(span);
  return span;
}

let holeCount = 0;

function onEvent(event) {
  const pane = event.branch !== undefined ? branchPane(event.branch) : null;
  switch (event.event) {
    case 'run':
      currentRun.id = event.id;
      break;
    case 'query':
      if (event.depth > 0) {
        const pane0 = branchPane(event.branch || 0);
        const nested = append(open(pane0), 'nested', '');
        nested.title = `nested query ${event.name}`;
        pane0.stack.push(nested);
      } else {
        $('status').textContent = `running on ${event.model || 'no model (no holes)'} · ${event.decoder}`;
      }
      break;
    case 'text':
      if (event.role && event.role !== pane.role) append(open(pane), 'role', `((${event.role})):`);
      pane.role = event.role || null;
      pane.lastText = append(open(pane), 'text', event.text);
      break;
    case 'hole': {
      const key = `h${holeCount++}`;
      const element = append(open(pane), `value running ${variableClass(event.variable)}`, '');
      element.dataset.key = key;
      element.title = `${event.variable} (generating)`;
      holes.set(key, { hole: event, tokens: [], value: null, element });
      pane.hole = key;
      break;
    }
    case 'token': {
      const entry = holes.get(pane.hole);
      if (!entry) break;
      const span = append(entry.element, 'tok', event.text);
      span.dataset.index = entry.tokens.length;
      entry.tokens.push(event);
      if (selectedKey === pane.hole) showTrace(pane.hole);
      break;
    }
    case 'value':
      onValue(pane, event);
      break;
    case 'result':
      if (event.depth > 0) {          // a nested query ended: its text stays, or its value replaces it
        const pane0 = branchPane(event.branch || 0);
        const nested = pane0.stack.pop();
        const returned = event.value !== undefined ? event.value : event.return;
        if (returned !== null && returned !== undefined) nested.classList.add('replaced');
        pane0.nested = nested;
        pane0.lastText = null;
      } else {
        $('result').innerHTML = `<pre class="code-block">${escapeHtml(JSON.stringify(resultView(event), null, 2))}</pre>`;
      }
      break;
    case 'branch':
      splitBranch(event);
      break;
    case 'pruned':
      pane.classList.add('pruned');
      break;
    case 'error':
      showError(event);
      break;
    case 'stopped':
      for (const p of $('prompt').querySelectorAll('.branch')) append(p, 'stopped-note', ' ■ stopped');
      break;
    default:
      break;
  }
}

// A beam split: the new branch starts as a copy of its parent's prompt, up to the split
// (its replay of the parent is not traced again), the hole in progress with the parent's
// first `tokens` tokens.
function splitBranch(event) {
  const parent = branchPane(event.parent);
  const child = branchPane(event.branch);
  for (const node of parent.childNodes) {
    if (!node.classList || !node.classList.contains('branch-label')) child.appendChild(node.cloneNode(true));
  }
  child.querySelector('.branch-label').textContent =
    `branch ${event.branch} (split from ${event.parent} at ${event.variable}, token ${event.tokens})`;
  const entry = holes.get(parent.hole);
  if (entry) {
    const key = `h${holeCount++}`;
    const element = child.querySelector(`.value[data-key="${parent.hole}"]`);
    for (const span of element.querySelectorAll('.tok')) {
      if (Number(span.dataset.index) >= event.tokens) span.remove();
    }
    element.dataset.key = key;
    element.classList.add('running');
    holes.set(key, { hole: entry.hole, tokens: entry.tokens.slice(0, event.tokens), value: null, element });
    child.hole = key;
  }
  child.role = parent.role;
}

function resultView(event) {
  const { event: _, depth: __, ...rest } = event;
  return rest;
}

// A finished value: the hole's span shows the value (a stop phrase cut off the last token
// is struck through); a nested query's value colours the text that replaced it, or its own
// text when it returned nothing.
function onValue(pane, event) {
  const entry = holes.get(pane.hole);
  if (event.finish === 'query') {
    const shown = pane.nested && (pane.nested.classList.contains('replaced') ? pane.lastText : pane.nested);
    if (shown) {
      shown.classList.add('value', variableClass(event.variable));
      shown.title = `${event.variable} = ${JSON.stringify(event.value)} (a nested query)`;
    }
    pane.nested = null;
    return;
  }
  if (!entry || entry.hole.variable !== event.variable || entry.value) return;
  entry.value = event;
  entry.element.classList.remove('running');
  entry.element.title = `${event.variable} = ${JSON.stringify(event.value)} (${event.finish}; click for its tokens)`;
  const spans = entry.element.querySelectorAll('.tok');
  if (event.finish === 'end' && spans.length && endsWithEndToken(entry.tokens, event.value)) {
    const last = spans[spans.length - 1];      // the end-of-text token: not part of the prompt
    last.className = 'tok end-token';
    last.dataset.label = last.textContent;
    last.textContent = '';
    last.title = 'the end token that ended the value (not in the prompt)';
  }
  if (typeof event.value === 'string' && event.finish === 'stop') {
    let kept = entry.tokens.map((t) => t.text).join('').indexOf(event.value) === 0 ? event.value.length : Infinity;
    for (const span of entry.element.querySelectorAll('.tok')) {
      const text = span.textContent;
      if (kept >= text.length) {
        kept -= text.length;
      } else {
        span.textContent = text.slice(0, kept);
        append(span, 'cut', text.slice(kept));
        kept = 0;
      }
    }
  }
  if (selectedKey === pane.hole) showTrace(pane.hole);
}

// Whether a value that ended with "end" ended on an end-of-text token (the decoder also
// ends a value that nothing can extend, without one): a text value is the other tokens'
// text; for a typed value (shown as its str()) the end token is a control token's name,
// such as <|im_end|> or </s>.
function endsWithEndToken(tokens, value) {
  const last = tokens[tokens.length - 1].text;
  const text = tokens.map((t) => t.text).join('');
  if (text === value) return false;
  return text.slice(0, text.length - last.length) === value || /^<[^<>\s]+>$/.test(last);
}

async function run() {
  if (currentRun) return;
  $('prompt').innerHTML = '';
  $('result').innerHTML = '';
  $('trace').innerHTML = '<p class="hint">Click a value in the prompt to see its tokens.</p>';
  holes.clear();
  holeCount = 0;
  selectedKey = null;
  showError(null);
  const controller = new AbortController();
  currentRun = { id: null, controller };
  setRunning(true, 'starting (the model loads on the first run)…');
  const started = performance.now();
  let last = null;
  try {
    const response = await fetch('/api/run', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, signal: controller.signal,
      body: JSON.stringify({ source: source.value, arguments: $('arguments').value.split('\n') }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line) {
          last = JSON.parse(line);
          onEvent(last);
        }
      }
    }
  } catch (e) {
    if (e.name !== 'AbortError') showError({ type: 'Error', message: String(e) });
  } finally {
    currentRun = null;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const errored = !$('error').hidden;
    setRunning(false, errored ? `failed after ${seconds} s` : `done in ${seconds} s`);
    if ($('prompt').querySelector('.stopped-note')) $('status').textContent = `stopped after ${seconds} s`;
    for (const el of $('prompt').querySelectorAll('.value.running')) el.classList.remove('running');
    document.body.dataset.runs = Number(document.body.dataset.runs || 0) + 1;
  }
  return last;
}

async function stop() {
  if (currentRun && currentRun.id) await post('/api/stop', { id: currentRun.id });
}

// ---------------------------------------------------------------------------------------
// The token trace of one value.

const percent = (logprob) => (logprob === null || logprob === undefined ? '' : `${(100 * Math.exp(logprob)).toFixed(1)}%`);
const visible = (text) => text.replace(/ /g, '·').replace(/\n/g, '↵').replace(/\t/g, '→');

function alternatives(list, chosen, allowedIds) {
  if (!list) return '<span class="hint">—</span>';
  return list.map(([id, text, logprob]) => {
    const cls = id === chosen ? 'chosen' : (allowedIds && !allowedIds.has(id) ? 'masked' : '');
    return `<span class="${cls}" title="token ${id}">${escapeHtml(visible(text))} ${percent(logprob)}</span>`;
  }).join('');
}

function showTrace(key) {
  const entry = holes.get(key);
  if (!entry) return;
  selectedKey = key;
  for (const el of $('prompt').querySelectorAll('.value.selected')) el.classList.remove('selected');
  entry.element.classList.add('selected');
  selectTab('trace');
  const hole = entry.hole;
  const stops = (hole.stops || []).map((s) => `${s.keep ? 'STOPS_AT' : 'STOPS_BEFORE'} ${JSON.stringify(s.phrase)}`).join(', ');
  const info = [`where ${hole.constraint || '(none)'}`,
    `token budget ${hole.budget === null || hole.budget === undefined ? 'none' : hole.budget}${stops ? ` · ${stops}` : ''}`,
    entry.value ? `value ${JSON.stringify(entry.value.value)} (finish: ${entry.value.finish})` : 'generating…'];
  const rows = entry.tokens.map((t, i) => {
    const masked = t.masked_top ? new Set(t.masked_top.map((a) => a[0])) : null;
    const width = Math.max(1, Math.round(60 * Math.exp(t.logprob)));
    return `<tr data-index="${i}"><td>${i + 1}</td><td class="text">${escapeHtml(visible(t.text))}</td><td>${t.id}</td>`
      + `<td><span class="bar" style="width:${width}px"></span>${percent(t.logprob)}</td>`
      + `<td>${percent(t.model_logprob)}</td>`
      + `<td>${t.allowed.toLocaleString('en')} / ${t.vocabulary.toLocaleString('en')}</td>`
      + `<td class="${t.forced ? 'forced' : ''}">${t.forced ? 'forced' : 'chosen'}</td>`
      + `<td class="alts">${alternatives(t.top, t.id, masked)}</td>`
      + `<td class="alts">${alternatives(t.masked_top, t.id, null)}</td></tr>`;
  }).join('');
  $('trace').innerHTML = `<h2><span class="tok-hole ${variableClass(hole.variable)}">${escapeHtml(hole.variable)}</span>`
    + ` · ${entry.tokens.length} token${entry.tokens.length === 1 ? '' : 's'}</h2>`
    + `<div class="hole-info">${escapeHtml(info.join('\n'))}</div>`
    + `<table class="tokens ${variableClass(hole.variable)}"><thead><tr><th>#</th><th>token</th><th>id</th>`
    + '<th title="probability under the mask">p</th><th title="the model\'s probability before the mask">model p</th>'
    + '<th title="tokens the mask allowed / vocabulary">allowed</th><th></th>'
    + '<th title="most likely before the mask (struck: masked)">top before mask</th><th>top after mask</th></tr></thead>'
    + `<tbody>${rows}</tbody></table>`
    + (hole.gbnf ? `<h3>GBNF</h3><pre class="code-block">${escapeHtml(hole.gbnf)}</pre>` : '');
}

$('prompt').addEventListener('click', (e) => {
  const value = e.target.closest('.value[data-key]');
  if (value) showTrace(value.dataset.key);
});
$('trace').addEventListener('mouseover', (e) => {
  for (const el of $('prompt').querySelectorAll('.tok.hover')) el.classList.remove('hover');
  const row = e.target.closest('tr[data-index]');
  const entry = holes.get(selectedKey);
  if (row && entry) {
    const span = entry.element.querySelector(`.tok[data-index="${row.dataset.index}"]`);
    if (span) span.classList.add('hover');
  }
});

// ---------------------------------------------------------------------------------------
// Tabs, examples, start.

function selectTab(name) {
  for (const button of document.querySelectorAll('.tabs button')) button.classList.toggle('active', button.dataset.tab === name);
  for (const tab of document.querySelectorAll('.tab')) tab.hidden = tab.id !== name;
}
for (const button of document.querySelectorAll('.tabs button')) button.addEventListener('click', () => selectTab(button.dataset.tab));
$('run').addEventListener('click', run);
$('stop').addEventListener('click', stop);

let examples = [];
$('examples').addEventListener('change', () => {
  const example = examples.find((e) => e.name === $('examples').value);
  if (!example) return;
  // `--arg NAME=VALUE` in an example's comments are the arguments it is meant to run with
  $('arguments').value = [...example.source.matchAll(/--arg (\w+=\S+)/g)].map((m) => m[1]).join('\n');
  setSource(example.source);
});

async function start() {
  renderEditor();
  try {
    await loadGrammars();
  } catch (e) {
    $('status').textContent = `highlighting unavailable: ${e}`;
  }
  examples = await (await fetch('/api/examples')).json();
  for (const example of examples) {
    const option = document.createElement('option');
    option.value = option.textContent = example.name;
    $('examples').appendChild(option);
  }
  if (!source.value) {
    const first = examples.find((e) => e.name === 'capital.lmq');
    setSource(first ? first.source : '"Q: What is the capital of France?\\nA:[ANSWER]" where STOPS_AT(ANSWER, ".")\n');
  }
  document.body.dataset.ready = 'true';
}

start();
