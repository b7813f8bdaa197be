// Tokenizes files with the TextMate engine VS Code uses (vscode-textmate + vscode-oniguruma)
// and prints, per file, the tokens with their scopes as JSON:
//   node test/tokenize.js FILE...   → {"FILE": [[line, text, [scope, ...]], ...], ...}
// .lmq files start in source.lmq; .py files in source.python with the lmq docstring injection.
'use strict';
const fs = require('fs');
const path = require('path');
const textmate = require('vscode-textmate');
const oniguruma = require('vscode-oniguruma');

const root = path.join(__dirname, '..');
const grammarFiles = {
  'source.lmq': path.join(root, 'syntaxes', 'lmq.tmLanguage.json'),
  'lmq.docstring.injection': path.join(root, 'syntaxes', 'lmq-docstring.injection.tmLanguage.json'),
  'source.python': require.resolve('tm-grammars/grammars/python.json'),
};
const manifest = require(path.join(root, 'package.json'));

async function registry() {
  const wasm = fs.readFileSync(require.resolve('vscode-oniguruma/release/onig.wasm'));
  await oniguruma.loadWASM(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength));
  return new textmate.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (patterns) => new oniguruma.OnigScanner(patterns),
      createOnigString: (text) => new oniguruma.OnigString(text),
    }),
    loadGrammar: async (scopeName) => {
      const file = grammarFiles[scopeName];
      return file ? textmate.parseRawGrammar(fs.readFileSync(file, 'utf8'), file) : null;
    },
    // the injections package.json declares, as VS Code applies them
    getInjections: (scopeName) => manifest.contributes.grammars
      .filter((g) => (g.injectTo || []).includes(scopeName)).map((g) => g.scopeName),
  });
}

async function main(files) {
  const reg = await registry();
  const out = {};
  for (const file of files) {
    const grammar = await reg.loadGrammar(file.endsWith('.py') ? 'source.python' : 'source.lmq');
    let state = textmate.INITIAL;
    const tokens = [];
    fs.readFileSync(file, 'utf8').split(/\r\n|\r|\n/).forEach((line, number) => {
      const result = grammar.tokenizeLine(line, state);
      for (const t of result.tokens) {
        tokens.push([number + 1, line.substring(t.startIndex, t.endIndex), t.scopes]);
      }
      state = result.ruleStack;
    });
    out[file] = tokens;
  }
  process.stdout.write(JSON.stringify(out));
}

main(process.argv.slice(2)).catch((e) => { console.error(e); process.exit(1); });
