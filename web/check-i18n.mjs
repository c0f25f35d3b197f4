// Smoke check of the chat page's strings: en.json and ko.json must parse, hold the same keys with string values,
// use the same {placeholders}, and cover every t('key') that app.js calls. Exits 1 on any problem.
// Run: node web/check-i18n.mjs
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const staticDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'sputnik', 'web', 'static');
const problems = [];

function load(lang) {
  const path = join(staticDir, 'i18n', `${lang}.json`);
  try {
    const data = JSON.parse(readFileSync(path, 'utf8'));
    if (data === null || typeof data !== 'object' || Array.isArray(data)) throw new Error('not a JSON object');
    for (const [key, value] of Object.entries(data)) {
      if (typeof value !== 'string') problems.push(`${lang}.json: "${key}" is not a string`);
    }
    return data;
  } catch (err) {
    problems.push(`${path}: ${err.message}`);
    return {};
  }
}

const en = load('en');
const ko = load('ko');
const placeholders = (s) => [...String(s).matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort().join(',');

for (const key of Object.keys(en)) if (!(key in ko)) problems.push(`ko.json lacks "${key}"`);
for (const key of Object.keys(ko)) if (!(key in en)) problems.push(`en.json lacks "${key}"`);
for (const key of Object.keys(en)) {
  if (key in ko && placeholders(en[key]) !== placeholders(ko[key])) {
    problems.push(`"${key}": placeholders differ (en: {${placeholders(en[key])}}, ko: {${placeholders(ko[key])}})`);
  }
}

const app = readFileSync(join(staticDir, 'app.js'), 'utf8');
for (const [, key] of app.matchAll(/\bt\('([a-z0-9_]+)'/g)) {
  if (!(key in en)) problems.push(`app.js uses t('${key}') but en.json lacks it`);
}

if (problems.length) {
  console.error([...new Set(problems)].join('\n'));
  process.exit(1);
}
console.log(`i18n ok: ${Object.keys(en).length} keys in en.json and ko.json`);
