// Copies the highlighting engine and grammars into the Python package, for the playground
// page (lmq/playground/static/): the page highlights with the same engine and grammar as
// VS Code, with no CDN and no build step at install. Run after changing a grammar or a
// pinned version: `npm ci && npm run vendor-playground`; tests/test_vscode_grammar.py checks
// that the copies are current.
'use strict';
const fs = require('fs');
const path = require('path');

const root = path.join(__dirname, '..');
const statics = path.join(root, '..', '..', 'lmq', 'playground', 'static');
const pkg = (name, file) => path.join(root, 'node_modules', name, file);

const copies = {
  'vendor/vscode-textmate.js': pkg('vscode-textmate', 'release/main.js'),
  'vendor/vscode-textmate.LICENSE.md': pkg('vscode-textmate', 'LICENSE.md'),
  'vendor/vscode-oniguruma.js': pkg('vscode-oniguruma', 'release/main.js'),
  'vendor/onig.wasm': pkg('vscode-oniguruma', 'release/onig.wasm'),
  'vendor/vscode-oniguruma.LICENSE.txt': pkg('vscode-oniguruma', 'LICENSE.txt'),
  'vendor/vscode-oniguruma.NOTICES.txt': pkg('vscode-oniguruma', 'NOTICES.txt'),
  'grammars/python.tmLanguage.json': pkg('tm-grammars', 'grammars/python.json'),
  'grammars/lmq.tmLanguage.json': path.join(root, 'syntaxes', 'lmq.tmLanguage.json'),
};

// The license sections of tm-grammars' NOTICE that cover python.json (it lists every grammar).
function pythonNotice() {
  const sections = fs.readFileSync(pkg('tm-grammars', 'NOTICE'), 'utf8').split(/^=+$/m);
  return sections.filter((s) => /^Files:.*\bpython\.json\b/m.test(s)).map((s) => s.trim()).join('\n\n' + '='.repeat(80) + '\n') + '\n';
}

if (require.main === module) {
  for (const [target, source] of Object.entries(copies)) {
    fs.mkdirSync(path.dirname(path.join(statics, target)), { recursive: true });
    fs.copyFileSync(source, path.join(statics, target));
    console.log(`${source} -> lmq/playground/static/${target}`);
  }
  fs.writeFileSync(path.join(statics, 'grammars', 'python.tmLanguage.NOTICE'), pythonNotice());
}
module.exports = { copies, statics };
