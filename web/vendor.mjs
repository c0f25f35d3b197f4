// Copies the prebuilt browser bundles of the chat page's libraries from web/node_modules into
// sputnik/web/static/vendor/, where `sputnik serve` serves them under /static/vendor/ (no CDN at run time).
// Run after `npm ci --prefix web`:  node web/vendor.mjs
import { cpSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, 'node_modules');
const out = join(here, '..', 'sputnik', 'web', 'static', 'vendor');

// [source under node_modules, destination under vendor/]; index.html links these exact destinations.
const files = [
  ['marked/lib/marked.umd.js', 'marked/marked.umd.js'],
  ['marked/LICENSE', 'marked/LICENSE'],
  ['dompurify/dist/purify.min.js', 'dompurify/purify.min.js'],
  ['dompurify/LICENSE', 'dompurify/LICENSE'],
  // plain `highlight.js` on npm ships no browser bundle; the project's own prebuilt package does
  ['@highlightjs/cdn-assets/highlight.min.js', 'highlight/highlight.min.js'],
  ['@highlightjs/cdn-assets/styles/github.min.css', 'highlight/github.min.css'],
  ['@highlightjs/cdn-assets/styles/github-dark.min.css', 'highlight/github-dark.min.css'],
  ['@highlightjs/cdn-assets/LICENSE', 'highlight/LICENSE'],
  ['katex/dist/katex.min.js', 'katex/katex.min.js'],
  ['katex/dist/katex.min.css', 'katex/katex.min.css'],
  ['katex/dist/contrib/auto-render.min.js', 'katex/contrib/auto-render.min.js'],
  ['katex/dist/fonts', 'katex/fonts'], // katex.min.css loads url(fonts/...) relative to itself
  ['katex/LICENSE', 'katex/LICENSE'],
];

const missing = files.filter(([src]) => !existsSync(join(modules, src)));
if (missing.length) {
  console.error(`vendor.mjs: missing in ${modules}:\n  ${missing.map(([src]) => src).join('\n  ')}`);
  console.error('run `npm ci --prefix web` first');
  process.exit(1);
}

rmSync(out, { recursive: true, force: true }); // no stale files from an older version
for (const [src, dest] of files) {
  const target = join(out, dest);
  mkdirSync(dirname(target), { recursive: true });
  cpSync(join(modules, src), target, { recursive: true });
}
console.log(`vendor.mjs: copied ${files.length} entries into ${out}`);
