// Sputnik web chat: one plain script, no framework and no build step.
// The page runs under a strict CSP (no inline script, no eval), so every element is built with the DOM API;
// the only innerHTML writes take DOMPurify's output. Talks only to the routes in docs/web-api.md.
'use strict';

(() => {
  // ------------------------------------------------------------------ small helpers

  const $ = (sel, root = document) => root.querySelector(sel);
  const enc = encodeURIComponent;

  // h('button', {class: 'x', text: 'Hi', onclick: fn}, ...children): the one way this file makes elements.
  function h(tag, props = {}, ...kids) {
    const el = document.createElement(tag);
    let value;
    for (const [k, v] of Object.entries(props)) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k === 'value') value = v; // set after the children (a <select> needs its options first)
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids.flat()) if (kid != null && kid !== false) el.append(kid);
    if (value !== undefined) el.value = value;
    return el;
  }

  function readCookie(name) {
    const hit = document.cookie.split('; ').find((c) => c.startsWith(name + '='));
    return hit ? decodeURIComponent(hit.slice(name.length + 1)) : null;
  }
  function writeCookie(name, value) {
    const secure = location.protocol === 'https:' ? '; Secure' : '';
    document.cookie = `${name}=${enc(value)}; Path=/; Max-Age=31536000; SameSite=Lax${secure}`;
  }

  // Enter submits, Shift+Enter is a newline, and the Enter that confirms an IME composition
  // (Korean, Japanese, Chinese input) never submits: browsers disagree on which flag they set, so check all.
  function onEnter(field, submit) {
    let composing = false;
    field.addEventListener('compositionstart', () => { composing = true; });
    field.addEventListener('compositionend', () => { composing = false; });
    field.addEventListener('keydown', (e) => {
      if (e.key !== 'Enter' || e.shiftKey) return;
      if (e.isComposing || e.keyCode === 229 || composing) return;
      e.preventDefault();
      submit();
    });
  }

  // ------------------------------------------------------------------ i18n
  // The server inlines the chosen language's strings as JSON data (not script) in #i18n.

  let STRINGS = {};
  try { STRINGS = JSON.parse($('#i18n').textContent); } catch { /* template not filled: fetched in boot() */ }
  const LANG = (document.documentElement.lang || 'en').toLowerCase().startsWith('ko') ? 'ko' : 'en';

  function t(key, vars = {}) {
    const s = STRINGS[key] ?? key;
    return s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
  }
  function thoughtLabel(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds)) return t('thought');
    const n = Math.max(1, Math.round(seconds));
    return n === 1 ? t('thought_for_one') : t('thought_for', { n });
  }

  // ------------------------------------------------------------------ theme
  // data-theme on <html>; the default follows the OS, an explicit choice is kept in the cookie sputnik_theme.

  const darkQuery = matchMedia('(prefers-color-scheme: dark)');
  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    // both highlight.js themes are linked; only the matching one stays enabled
    for (const link of document.querySelectorAll('link[data-hljs-theme]')) {
      link.disabled = link.dataset.hljsTheme !== theme;
    }
    const btn = $('#theme-toggle');
    if (btn) labelThemeButton(btn, theme);
  }
  function labelThemeButton(btn, theme) {
    const label = theme === 'dark' ? t('theme_to_light') : t('theme_to_dark');
    btn.textContent = theme === 'dark' ? '☀' : '☾';
    btn.title = label;
    btn.setAttribute('aria-label', label);
  }
  const savedTheme = readCookie('sputnik_theme');
  applyTheme(savedTheme === 'dark' || savedTheme === 'light' ? savedTheme : darkQuery.matches ? 'dark' : 'light');
  darkQuery.addEventListener('change', (e) => {
    if (!readCookie('sputnik_theme')) applyTheme(e.matches ? 'dark' : 'light');
  });

  // Language select and theme toggle, shown signed in and signed out alike.
  function prefsControls() {
    const lang = h('select', { id: 'lang-switch', 'aria-label': t('language'), title: t('language'), value: LANG,
      onchange: () => { writeCookie('sputnik_lang', lang.value); location.reload(); } },
    h('option', { value: 'en', text: 'English' }), h('option', { value: 'ko', text: '한국어' }));
    const theme = h('button', { id: 'theme-toggle', type: 'button', class: 'icon-btn', onclick: () => {
      const next = document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark';
      writeCookie('sputnik_theme', next);
      applyTheme(next);
    } });
    labelThemeButton(theme, document.documentElement.dataset.theme);
    return h('div', { class: 'prefs' }, lang, theme);
  }

  // ------------------------------------------------------------------ API
  // Same-origin cookies carry the session; the CSRF token from /api/me lives only in memory.

  const state = { me: null, csrf: '', signupOpen: false, providers: [], convs: [], convId: null, stream: null };

  class ApiError extends Error {
    constructor(message, status, code, retryAfter) {
      super(message);
      Object.assign(this, { status, code, retryAfter });
    }
  }
  async function apiError(res) {
    let message = '', code = '';
    try {
      const body = await res.json();
      message = body?.error?.message || (typeof body?.detail === 'string' ? body.detail : '');
      code = body?.error?.code || '';
    } catch { /* not JSON */ }
    return new ApiError(message || `${res.status} ${res.statusText}`, res.status, code,
      Number(res.headers.get('Retry-After')) || 0);
  }
  function request(method, path, body, extra = {}) {
    const headers = { Accept: 'application/json' };
    if (method !== 'GET') headers['X-CSRF-Token'] = state.csrf;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    return fetch(path, { method, headers, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body), ...extra });
  }
  async function api(method, path, body) {
    const res = await request(method, path, body);
    if (!res.ok) throw await apiError(res);
    return (res.headers.get('content-type') || '').includes('json') ? res.json() : null;
  }
  function errorText(err) {
    if (err?.status === 429) return t('error_rate_limited', { n: err.retryAfter || 60 });
    const known = { invalid_credentials: 'error_invalid_credentials', signup_closed: 'error_signup_closed',
      signup_failed: 'error_signup_failed', busy: 'error_busy' };
    if (known[err?.code]) return t(known[err.code]);
    if (err instanceof TypeError) return t('error_network'); // fetch itself failed
    return err?.message || t('error_generic');
  }

  let toastTimer;
  function toast(text) {
    let el = $('#toast');
    if (!el) document.body.append(el = h('div', { id: 'toast', role: 'status' }));
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
  }

  async function copyText(text, btn) {
    try {
      await navigator.clipboard.writeText(text);
    } catch { // no clipboard API on plain http outside localhost
      const area = h('textarea', { class: 'offscreen' });
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand('copy');
      area.remove();
    }
    btn.textContent = t('copied');
    setTimeout(() => { btn.textContent = t('copy'); }, 1500);
  }
  const copyButton = (cls, getText) => h('button', { type: 'button', class: `small-btn ${cls}`, text: t('copy'),
    onclick: (e) => copyText(getText(), e.currentTarget) });

  // ------------------------------------------------------------------ markdown, code and math
  // marked -> DOMPurify -> highlight.js + KaTeX on the sanitized tree. Math is cut out of the markdown first
  // (so `_` and `\(` are not eaten as markdown) and emitted as escaped text in .math spans, which KaTeX's
  // auto-render then renders after sanitizing.

  const haveMarkdown = typeof marked !== 'undefined' && typeof DOMPurify !== 'undefined';
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const mathHtml = (tex, display) => (display
    ? `<div class="math math-block">\\[${escapeHtml(tex)}\\]</div>`
    : `<span class="math math-inline">\\(${escapeHtml(tex)}\\)</span>`);

  if (haveMarkdown) {
    marked.use({
      gfm: true,
      breaks: false,
      extensions: [
        { // $$…$$ or \[…\] alone on its lines
          name: 'mathBlock', level: 'block',
          start: (src) => src.match(/^ {0,3}(\$\$|\\\[)/m)?.index,
          tokenizer(src) {
            const m = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n+|$)/.exec(src);
            if (m) return { type: 'mathBlock', raw: m[0], tex: (m[1] ?? m[2]).trim() };
          },
          renderer: (tok) => mathHtml(tok.tex, true),
        },
        { // $…$, \(…\), and $$…$$ / \[…\] inside a line. "$5 and $10" stays text: no space inside the
          // dollars' edges and no digit right after the closing one.
          name: 'mathInline', level: 'inline',
          start: (src) => src.match(/\$|\\\(|\\\[/)?.index,
          tokenizer(src) {
            let m;
            if ((m = /^\$\$([\s\S]+?)\$\$/.exec(src)) || (m = /^\\\[([\s\S]+?)\\\]/.exec(src))) {
              return { type: 'mathInline', raw: m[0], tex: m[1].trim(), display: true };
            }
            if ((m = /^\\\(([\s\S]+?)\\\)/.exec(src))
              || (m = /^\$(?![\s$])((?:\\[\s\S]|[^\\$\n])+?)(?<!\s)\$(?!\d)/.exec(src))) {
              return { type: 'mathInline', raw: m[0], tex: m[1], display: false };
            }
          },
          renderer: (tok) => mathHtml(tok.tex, tok.display),
        },
      ],
    });
    // Model output is markdown, never HTML: raw HTML shows as the text it is, a task list item as a plain mark,
    // and an image from anywhere but this page (which would load a URL the model chose, with data in its
    // query) becomes a link the reader may follow.
    marked.use({ renderer: {
      html: (tok) => escapeHtml(tok.text),
      checkbox: (tok) => (tok.checked ? '☑ ' : '☐ '),
      image(tok) {
        const href = tok.href || '';
        if (/^data:image\/(png|gif|jpeg|webp);/i.test(href) || /^\/(?!\/)/.test(href)) {
          return `<img src="${escapeHtml(href)}" alt="${escapeHtml(tok.text || '')}">`;
        }
        return `<a href="${escapeHtml(href)}">${escapeHtml(tok.text || href)}</a>`;
      },
    } });
    // Links open in a new tab and leak neither window.opener nor the referrer.
    DOMPurify.addHook('afterSanitizeAttributes', (node) => {
      if (node.tagName === 'A' && node.hasAttribute('href')) {
        node.setAttribute('rel', 'noopener noreferrer');
        if (!node.getAttribute('href').startsWith('#')) node.setAttribute('target', '_blank');
      }
    });
    // Of classes only the few this file and highlight.js give: a model must not borrow the page's own
    // (a .popover drawn outside its bubble).
    DOMPurify.addHook('uponSanitizeAttribute', (node, data) => {
      if (data.attrName !== 'class') return;
      data.attrValue = data.attrValue.split(/\s+/).filter((c) => OWN_CLASS.test(c)).join(' ');
      if (!data.attrValue) data.keepAttr = false;
    });
  }
  const OWN_CLASS = /^(language-[\w+#.-]+|math|math-block|math-inline|hljs(-[\w-]+)*)$/;
  // Only what markdown makes: no forms or controls, no <style>/style=, no ids or names, no svg or media.
  const PURIFY = {
    ALLOWED_TAGS: ['a', 'b', 'blockquote', 'br', 'code', 'del', 'div', 'em', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6',
      'hr', 'i', 'img', 'li', 'ol', 'p', 'pre', 's', 'span', 'strong', 'sub', 'sup', 'table', 'tbody', 'td',
      'th', 'thead', 'tr', 'ul'],
    ALLOWED_ATTR: ['href', 'title', 'alt', 'src', 'class', 'start', 'align', 'colspan', 'rowspan'],
    ALLOW_DATA_ATTR: false,
  };

  // A tool call the model wrote (Hermes/Qwen `<tool_call>{"name", "arguments"}</tool_call>`) as a labelled JSON
  // block: the page shows calls, it never runs them. An unfinished call (still streaming) shows as written so far.
  function showToolCalls(text) {
    return text.replace(/<tool_call>\s*([\s\S]*?)\s*(?:<\/tool_call>|$)/g, (all, body) => {
      let name = '', args = body;
      try {
        const call = JSON.parse(body);
        name = String(call.name || '');
        args = JSON.stringify(call.arguments ?? call.parameters ?? {}, null, 2);
      } catch (e) { /* not (yet) JSON: show the text as it is */ }
      return `\n\n**${t('tool_call')}** \`${name.replace(/`/g, '')}\`\n\n\`\`\`json\n${args}\n\`\`\`\n\n`;
    });
  }

  function renderMarkdown(el, text, final = true) {
    text = showToolCalls(text);
    if (!haveMarkdown) { el.textContent = text; return; } // never show unsanitized HTML
    el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
    decorateCode(el, final);
    if (typeof renderMathInElement === 'function') {
      for (const m of el.querySelectorAll('.math')) {
        renderMathInElement(m, { throwOnError: false, delimiters: [
          { left: '\\[', right: '\\]', display: true }, { left: '\\(', right: '\\)', display: false }] });
      }
    }
  }

  // Highlight each code block and give it a header with its language and a copy button.
  // Auto-detecting the language is slow, so it waits for the final render of a streamed answer.
  function decorateCode(root, final) {
    for (const code of root.querySelectorAll('pre > code')) {
      const pre = code.parentElement;
      const text = code.textContent;
      let lang = ([...code.classList].find((c) => c.startsWith('language-')) || '').slice(9);
      if (typeof hljs !== 'undefined') {
        let out = null;
        if (lang && hljs.getLanguage(lang)) out = hljs.highlight(text, { language: lang, ignoreIllegals: true });
        else if (!lang && final && text.length < 20000) out = hljs.highlightAuto(text);
        if (out) {
          code.innerHTML = DOMPurify.sanitize(out.value, PURIFY); // hljs escapes; sanitize anyway
          code.classList.add('hljs');
          lang = lang || out.language || '';
        }
      }
      const block = h('div', { class: 'code-block' },
        h('div', { class: 'code-head' }, h('span', { class: 'code-lang', text: lang }),
          copyButton('copy-code', () => text)));
      pre.replaceWith(block);
      block.append(pre);
    }
  }

  // ------------------------------------------------------------------ boot and the signed-out page

  const root = $('#app');
  const brand = document.title || 'Sputnik';

  async function boot() {
    if (!Object.keys(STRINGS).length) { // opened without the server filling the template
      try { STRINGS = await (await fetch(`/static/i18n/${LANG}.json`)).json(); } catch { /* show the keys */ }
    }
    let me;
    try {
      me = await api('GET', '/api/me');
    } catch (err) {
      root.replaceChildren(h('div', { class: 'fatal' }, h('p', { text: errorText(err) }),
        h('button', { type: 'button', class: 'btn', text: t('retry'), onclick: boot })));
      return;
    }
    Object.assign(state, { me: me.user, csrf: me.csrf || '', signupOpen: !!me.signup_open,
      providers: me.providers || [] });
    if (state.me) renderApp(); else renderAuth();
  }

  function field(id, label, attrs) {
    return h('label', { class: 'field', for: id }, h('span', { text: label }), h('input', { id, ...attrs }));
  }

  function renderAuth() {
    document.title = brand;
    const signinError = h('p', { id: 'signin-error', class: 'form-error', role: 'alert' });
    const signupError = h('p', { id: 'signup-error', class: 'form-error', role: 'alert' });

    // Forms skip the browser's own validation so the API's (translated) messages show inline instead.
    async function submit(form, errorEl, path, body) {
      errorEl.textContent = '';
      const button = $('button[type=submit]', form);
      button.disabled = true;
      try {
        await api('POST', path, body);
        await boot(); // fresh /api/me: the user and a CSRF token for the new session
      } catch (err) {
        errorEl.textContent = errorText(err);
        button.disabled = false;
      }
    }
    const signin = h('form', { id: 'signin-form', class: 'auth-form', novalidate: true, onsubmit: (e) => {
      e.preventDefault();
      submit(signin, signinError, '/api/auth/signin',
        { email: $('#signin-email').value.trim(), password: $('#signin-password').value });
    } },
    field('signin-email', t('email'), { type: 'email', autocomplete: 'username', required: true }),
    field('signin-password', t('password'), { type: 'password', autocomplete: 'current-password', required: true }),
    signinError,
    h('button', { id: 'signin-submit', type: 'submit', class: 'btn primary', text: t('sign_in') }));

    const signup = h('form', { id: 'signup-form', class: 'auth-form', novalidate: true, hidden: true,
      onsubmit: (e) => {
        e.preventDefault();
        const password = $('#signup-password').value;
        if (password.length < 8) { signupError.textContent = t('error_password_short'); return; }
        const body = { email: $('#signup-email').value.trim(), password };
        const name = $('#signup-name').value.trim();
        if (name) body.name = name;
        submit(signup, signupError, '/api/auth/signup', body);
      } },
    field('signup-name', t('name'), { type: 'text', autocomplete: 'name' }),
    field('signup-email', t('email'), { type: 'email', autocomplete: 'username', required: true }),
    field('signup-password', t('password'), { type: 'password', autocomplete: 'new-password', required: true,
      minlength: 8, placeholder: t('password_hint') }),
    signupError,
    h('button', { id: 'signup-submit', type: 'submit', class: 'btn primary', text: t('sign_up') }));

    const showTab = (which) => {
      signin.hidden = which !== 'signin';
      signup.hidden = which !== 'signup';
      tabIn.setAttribute('aria-selected', which === 'signin');
      tabUp.setAttribute('aria-selected', which === 'signup');
      $(`#${which}-email`).focus();
    };
    const tabIn = h('button', { id: 'tab-signin', type: 'button', role: 'tab', 'aria-selected': 'true',
      text: t('sign_in'), onclick: () => showTab('signin') });
    const tabUp = h('button', { id: 'tab-signup', type: 'button', role: 'tab', 'aria-selected': 'false',
      text: t('sign_up'), hidden: !state.signupOpen, onclick: () => showTab('signup') });

    const providers = state.providers.map((p) => h('a', { class: 'btn oidc-login', 'data-provider': p.id,
      href: `/auth/oidc/${enc(p.id)}/login`, text: t('sign_in_with', { provider: p.name || p.id }) }));

    root.replaceChildren(h('div', { class: 'auth-page' },
      h('header', { class: 'auth-top' }, prefsControls()),
      h('main', { class: 'auth-card' },
        h('h1', { class: 'brand', text: brand }),
        h('div', { class: 'tabs', role: 'tablist' }, tabIn, tabUp),
        signin, signup,
        state.signupOpen ? null : h('p', { class: 'note', text: t('signup_closed_note') }),
        providers.length ? h('div', { class: 'oidc' }, h('div', { class: 'divider', text: t('or') }), providers) : null)));
    $('#signin-email').focus();
  }

  // ------------------------------------------------------------------ the signed-in page

  let ui = {}; // elements of the signed-in page, kept here instead of looked up by id each time
  const settings = { model: null, thinks: {} };

  function renderApp() {
    ui = {};
    ui.convList = h('ul', { id: 'conv-list' });
    ui.search = h('input', { id: 'conv-search', type: 'search', placeholder: t('search'), 'aria-label': t('search') });
    let searchTimer;
    ui.search.addEventListener('input', () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(loadConversations, 250);
    });
    const sidebar = h('aside', { id: 'sidebar' },
      h('div', { class: 'sidebar-head' }, h('span', { class: 'brand', text: brand }),
        h('button', { id: 'new-chat', type: 'button', class: 'btn', text: t('new_chat'), onclick: () => {
          document.body.classList.remove('sidebar-open');
          leaveForNewChat();
        } })),
      ui.search, ui.convList,
      h('div', { class: 'sidebar-foot' },
        state.me.is_admin ? h('button', { id: 'admin-open', type: 'button', class: 'btn', text: t('admin'),
          onclick: openAdmin }) : null,
        h('button', { id: 'account-open', type: 'button', class: 'btn', text: t('account'), onclick: openAccount }),
        h('div', { class: 'user-row' },
          h('span', { id: 'user-name', text: state.me.name || state.me.email, title: state.me.email }),
          h('button', { id: 'signout', type: 'button', class: 'btn', text: t('sign_out'), onclick: signOut }))));

    ui.title = h('h1', { id: 'conv-title' });
    ui.model = h('select', { id: 'model-picker', 'aria-label': t('model'), title: t('model'), hidden: true,
      onchange: () => { settings.model = ui.model.value; showThinkingSwitch(); } });
    ui.temperature = h('input', { id: 'settings-temperature', type: 'number', min: 0, max: 2, step: 0.1,
      placeholder: t('default') });
    ui.maxTokens = h('input', { id: 'settings-max-tokens', type: 'number', min: 1, step: 1, placeholder: t('default') });
    ui.settings = h('div', { id: 'settings-panel', class: 'popover', hidden: true },
      h('h2', { text: t('settings') }),
      h('label', { class: 'field', for: 'settings-temperature' }, h('span', { text: t('temperature') }), ui.temperature),
      h('label', { class: 'field', for: 'settings-max-tokens' }, h('span', { text: t('max_tokens') }), ui.maxTokens));
    const settingsToggle = h('button', { id: 'settings-toggle', type: 'button', class: 'icon-btn', text: '⚙',
      title: t('settings'), 'aria-label': t('settings'), onclick: () => { ui.settings.hidden = !ui.settings.hidden; } });

    ui.list = h('div', { id: 'message-list' });
    ui.empty = h('div', { id: 'empty-state', text: t('empty_state') });
    ui.scroller = h('div', { id: 'messages' }, h('div', { class: 'messages-inner' }, ui.empty, ui.list));

    ui.composer = h('textarea', { id: 'composer', rows: 1, placeholder: t('composer_placeholder'),
      'aria-label': t('composer_placeholder') });
    ui.composer.addEventListener('input', () => autoGrow(ui.composer));
    onEnter(ui.composer, submitComposer);
    ui.thinking = h('input', { id: 'settings-thinking', type: 'checkbox', checked: true,
      onchange: () => { ui.effort.disabled = !ui.thinking.checked; } });
    // How hard to think: the API's reasoning_effort (DeepSeek's default is high).
    ui.effort = h('select', { id: 'settings-effort', 'aria-label': t('effort'), title: t('effort'), value: 'high' },
      ...['low', 'medium', 'high'].map((e) => h('option', { value: e, text: t(`effort_${e}`) })));
    ui.send = h('button', { id: 'send', type: 'submit', class: 'btn primary', text: t('send') });
    ui.sendError = h('div', { id: 'send-error', class: 'send-error', role: 'alert', hidden: true });
    ui.stop = h('button', { id: 'stop', type: 'button', class: 'btn danger', text: t('stop'), hidden: true,
      onclick: stopStream });
    const composerForm = h('form', { id: 'composer-form', onsubmit: (e) => { e.preventDefault(); submitComposer(); } },
      ui.composer,
      h('div', { class: 'composer-bar' },
        ui.thinkingSwitch = h('label', { id: 'thinking-switch', class: 'switch', for: 'settings-thinking', hidden: true },
          ui.thinking, h('span', { text: t('thinking_mode') })),
        ui.effortPicker = h('label', { id: 'effort-picker', class: 'effort', for: 'settings-effort', hidden: true },
          h('span', { text: t('effort') }), ui.effort),
        h('span', { class: 'spacer' }), ui.stop, ui.send));

    const main = h('main', { class: 'chat' },
      h('header', { class: 'topbar' },
        h('button', { id: 'sidebar-toggle', type: 'button', class: 'icon-btn', text: '☰', 'aria-label': t('conversations'),
          onclick: () => document.body.classList.toggle('sidebar-open') }),
        ui.title, h('span', { class: 'spacer' }), ui.model, settingsToggle, prefsControls()),
      ui.settings, ui.scroller,
      h('div', { class: 'composer-wrap' }, ui.sendError, composerForm));

    root.replaceChildren(h('div', { class: 'layout' }, sidebar, main));
    loadConversations();
    loadModels();
    route();
  }

  document.addEventListener('click', (e) => { // a click outside closes the settings popover
    if (ui.settings && !ui.settings.hidden && !e.target.closest('#settings-panel, #settings-toggle')) {
      ui.settings.hidden = true;
    }
  });

  function autoGrow(area) {
    area.style.height = 'auto';
    area.style.height = Math.min(area.scrollHeight, 240) + 'px';
  }

  async function signOut() {
    abortStream();
    try { await api('POST', '/api/auth/signout'); } catch (err) { toast(errorText(err)); }
    history.replaceState(null, '', location.pathname);
    boot();
  }

  async function loadModels() {
    try {
      const models = (await api('GET', '/api/models'))?.data || [];
      const ids = models.map((m) => m.id);
      settings.thinks = Object.fromEntries(models.map((m) => [m.id, !!m.thinking]));
      ui.model.replaceChildren(...ids.map((id) => h('option', { value: id, text: id })));
      ui.model.hidden = !ids.length;
      settings.model = ids.includes(settings.model) ? settings.model : ids[0] ?? null;
      if (settings.model) ui.model.value = settings.model;
    } catch { ui.model.hidden = true; }
    showThinkingSwitch();
  }
  // The switch closes a thought the chat template opens: a model that does not think has nothing to switch.
  function showThinkingSwitch() {
    ui.thinkingSwitch.hidden = ui.effortPicker.hidden = !settings.thinks?.[settings.model];
  }

  // ------------------------------------------------------------------ conversations (sidebar)

  const convPath = (id) => `/api/conversations/${enc(id)}`;

  async function loadConversations() {
    const q = ui.search.value.trim();
    try {
      state.convs = await api('GET', '/api/conversations' + (q ? `?q=${enc(q)}` : ''));
      renderConvList();
    } catch (err) { toast(errorText(err)); }
  }

  function renderConvList() {
    ui.convList.replaceChildren(...state.convs.map((c) => {
      const li = h('li', { class: 'conv-item' + (String(c.id) === String(state.convId) ? ' active' : ''),
        'data-id': c.id });
      li.append(
        h('a', { class: 'conv-link', href: `#/c/${enc(c.id)}`, title: c.title || t('new_chat'),
          onclick: () => document.body.classList.remove('sidebar-open') },
        h('span', { class: 'conv-title', text: c.title || t('new_chat') })),
        h('div', { class: 'conv-actions' },
          h('button', { type: 'button', class: 'conv-rename', text: '✎', title: t('rename'), 'aria-label': t('rename'),
            onclick: () => startRename(li, c) }),
          h('a', { class: 'conv-export-json', href: `${convPath(c.id)}/export?format=json`, download: true,
            text: 'JSON', title: t('export_json') }),
          h('a', { class: 'conv-export-md', href: `${convPath(c.id)}/export?format=md`, download: true,
            text: 'MD', title: t('export_md') }),
          h('button', { type: 'button', class: 'conv-delete', text: '✕', title: t('delete'), 'aria-label': t('delete'),
            onclick: () => deleteConversation(c) })));
      return li;
    }));
    if (!state.convs.length) {
      const searching = !!ui.search.value.trim();
      ui.convList.append(h('li', { class: 'conv-none', text: t(searching ? 'no_results' : 'no_conversations') }));
    }
  }

  function startRename(li, conv) {
    const input = h('input', { class: 'conv-rename-input', value: conv.title || '', 'aria-label': t('rename') });
    li.replaceChildren(input);
    input.focus();
    input.select();
    let finished = false;
    const finish = async (save) => {
      if (finished) return;
      finished = true;
      const title = input.value.trim();
      if (save && title && title !== conv.title) {
        try {
          conv.title = (await api('PATCH', convPath(conv.id), { title }))?.title ?? title;
          if (String(conv.id) === String(state.convId)) setTitle(conv.title);
        } catch (err) { toast(errorText(err)); }
      }
      renderConvList();
    };
    onEnter(input, () => finish(true));
    input.addEventListener('keydown', (e) => { if (e.key === 'Escape') finish(false); });
    input.addEventListener('blur', () => finish(true));
  }

  async function deleteConversation(conv) {
    if (!confirm(t('confirm_delete', { title: conv.title || t('new_chat') }))) return;
    try {
      await api('DELETE', convPath(conv.id));
      state.convs = state.convs.filter((c) => c !== conv);
      if (String(conv.id) === String(state.convId)) {
        leaveForNewChat();
      }
      renderConvList();
    } catch (err) { toast(errorText(err)); }
  }

  function setTitle(title) {
    ui.title.textContent = title || t('new_chat');
    document.title = title ? `${title} · ${brand}` : brand;
  }

  // The open conversation lives in the URL hash (#/c/ID), so reload and back/forward work.
  function route() {
    const m = /^#\/c\/(.+)$/.exec(location.hash);
    if (m) openConversation(decodeURIComponent(m[1])); else newChat();
  }
  window.addEventListener('hashchange', () => { if (state.me && ui.list) route(); });

  // The empty chat shows at once; the hash is cleared with pushState, which fires no hashchange (setting
  // location.hash would show it a task later, after the old title), and back still returns to the chat left.
  function leaveForNewChat() {
    if (location.hash) history.pushState(null, '', location.pathname + location.search);
    newChat();
  }

  function newChat() {
    abortStream();
    state.convId = null;
    ui.list.replaceChildren();
    ui.empty.hidden = false;
    setTitle('');
    renderConvList();
    ui.composer.focus();
  }

  async function openConversation(id) {
    if (state.stream && String(state.stream.convId) === String(id)) return; // already showing it live
    abortStream();
    state.convId = id;
    renderConvList();
    ui.list.replaceChildren();
    ui.empty.hidden = true;
    try {
      const conv = await api('GET', convPath(id));
      if (state.convId !== id) return; // the user moved on meanwhile
      showConversation(conv);
      ui.scroller.scrollTop = ui.scroller.scrollHeight;
    } catch (err) {
      toast(errorText(err));
      if (err.status === 404) location.hash = '';
    }
  }

  // The branch of the conversation on show, as the server sends it (opening a chat, or picking a version).
  function showConversation(conv) {
    setTitle(conv.title);
    ui.list.replaceChildren();
    const messages = conv.messages || [];
    const last = messages[messages.length - 1];
    // An unfinished last answer may still be being written on the server: reattach and see it grow.
    const writing = last?.role === 'assistant' && last.finished === false;
    for (const m of writing ? messages.slice(0, -1) : messages) {
      if (m.role === 'user') ui.list.append(userMessage(m));
      else if (m.role === 'assistant') ui.list.append(savedAnswer(m));
    }
    ui.empty.hidden = ui.list.childElementCount > 0 || writing;
    updateRegenerate();
    if (writing) attach(last);
  }

  // ‹ 2/3 ›: the versions of a turn (a question edited, an answer regenerated); picking one shows its branch,
  // and the server keeps the choice, so a reload shows it too.
  function setVersions(el, versions) {
    $('.versions', el)?.remove();
    el.versions = versions || [el.msgId];
    const at = el.versions.findIndex((v) => String(v) === String(el.msgId));
    if (el.versions.length < 2 || at < 0) return;
    const step = (by, cls, text, label) => h('button', { type: 'button', class: `small-btn ${cls}`, text,
      title: t(label), 'aria-label': t(label), disabled: !el.versions[at + by],
      onclick: () => showVersion(el.versions[at + by]) });
    el.actions.prepend(h('span', { class: 'versions' }, step(-1, 'version-prev', '‹', 'previous_version'),
      h('span', { class: 'version-label', text: `${at + 1}/${el.versions.length}` }),
      step(1, 'version-next', '›', 'next_version')));
  }

  async function showVersion(id) {
    if (state.stream || !state.convId) return;
    const convId = state.convId, top = ui.scroller.scrollTop;
    try {
      const conv = await api('POST', `${convPath(convId)}/version`, { message_id: id });
      if (state.convId !== convId) return;
      showConversation(conv);
      ui.scroller.scrollTop = top; // the turn picked stays where it was
    } catch (err) { toast(errorText(err)); }
  }

  // ------------------------------------------------------------------ messages

  function userMessage(m) {
    const el = h('article', { class: 'msg user', 'data-id': m.id ?? '' });
    el.msgId = m.id ?? null; // keeps the JSON type (number or string) for edit_of
    el.raw = m.content || '';
    const content = h('div', { class: 'content', text: el.raw }); // plain text, never HTML
    el.actions = h('div', { class: 'msg-actions' }, copyButton('copy-msg', () => el.raw),
      h('button', { type: 'button', class: 'small-btn edit', text: t('edit'), onclick: () => startEdit(el) }));
    el.append(h('div', { class: 'bubble' }, content), el.actions);
    if (m.versions) setVersions(el, m.versions);
    return el;
  }

  function assistantMessage(id) {
    const el = h('article', { class: 'msg assistant', 'data-id': id ?? '' });
    el.msgId = id;
    el.raw = { content: '', reasoning: '' };
    el.reasoning = h('details', { class: 'reasoning', hidden: true },
      h('summary', { text: t('thinking') }), h('div', { class: 'reasoning-body markdown' }));
    el.content = h('div', { class: 'content markdown' });
    el.actions = h('div', { class: 'msg-actions' }, copyButton('copy-msg', () => el.raw.content));
    el.append(el.reasoning, el.content, el.actions);
    return el;
  }

  // Reasoning, once over, collapses into "Thought for N seconds".
  function closeReasoning(el, seconds) {
    if (el.reasoning.hidden) return;
    el.reasoning.open = false;
    el.reasoning.classList.remove('live');
    $('summary', el.reasoning).textContent = thoughtLabel(seconds);
  }

  function markUnfinished(el) {
    if (!$('.unfinished', el)) el.actions.prepend(h('span', { class: 'unfinished', text: t('unfinished'),
      title: t('unfinished_hint') }));
  }

  function savedAnswer(m) {
    const el = assistantMessage(m.id);
    el.raw = { content: m.content || '', reasoning: m.reasoning || '' };
    if (el.raw.reasoning) {
      el.reasoning.hidden = false;
      renderMarkdown($('.reasoning-body', el), el.raw.reasoning);
      closeReasoning(el, m.reasoning_seconds);
    }
    renderMarkdown(el.content, el.raw.content);
    if (m.finished === false) markUnfinished(el);
    el.finishReason = m.finish_reason;
    if (m.versions) setVersions(el, m.versions);
    return el;
  }

  // Only the last answer can be regenerated (or, when it stopped at the token limit, continued), and not while
  // one is streaming.
  function updateRegenerate() {
    for (const b of ui.list.querySelectorAll('.regenerate, .continue')) b.remove();
    const last = ui.list.lastElementChild;
    if (state.stream || !last?.classList.contains('assistant')) return;
    if (last.finishReason === 'length') {
      last.actions.append(h('button', { type: 'button', class: 'small-btn continue', text: t('continue'),
        title: t('continue_hint'), onclick: () => {
          if (!state.stream) streamAnswer({ continue: true }, null, null, last);
        } }));
    }
    last.actions.append(h('button', { type: 'button', class: 'small-btn regenerate', text: t('regenerate'),
      onclick: () => {
        if (state.stream) return;
        last.remove();
        streamAnswer({ content: '', regenerate: true });
      } }));
  }

  function startEdit(el) {
    if (state.stream || el.msgId == null || $('.edit-input', el)) return;
    const bubble = $('.bubble', el);
    const area = h('textarea', { class: 'edit-input', 'aria-label': t('edit') });
    area.value = el.raw;
    const done = () => { form.remove(); bubble.hidden = false; };
    const save = () => {
      const content = area.value;
      if (!content.trim() || state.stream) return;
      done();
      el.raw = content;
      $('.content', el).textContent = content;
      while (el.nextElementSibling) el.nextElementSibling.remove(); // they stay with the old version
      streamAnswer({ content, edit_of: el.msgId }, el);
    };
    const form = h('div', { class: 'edit-form' }, area, h('div', { class: 'edit-bar' },
      h('button', { type: 'button', class: 'btn edit-cancel', text: t('cancel'), onclick: done }),
      h('button', { type: 'button', class: 'btn primary edit-save', text: t('save_and_send'), onclick: save })));
    onEnter(area, save);
    area.addEventListener('keydown', (e) => { if (e.key === 'Escape') done(); });
    bubble.hidden = true;
    bubble.after(form);
    autoGrow(area);
    area.addEventListener('input', () => autoGrow(area));
    area.focus();
  }

  // ------------------------------------------------------------------ sending and streaming

  let creating = false; // a conversation is being created for the first message: don't create two
  async function submitComposer() {
    const content = ui.composer.value;
    if (!content.trim() || state.stream || creating) return;
    ui.sendError.hidden = true;
    if (!state.convId) { // first message: create the conversation, then stream into it
      creating = true;
      ui.send.disabled = true;
      try {
        const conv = await api('POST', '/api/conversations', {});
        state.convId = conv.id;
        state.convs.unshift(conv);
        history.replaceState(null, '', `#/c/${enc(conv.id)}`); // no hashchange: nothing to reload
        renderConvList();
      } catch (err) { showSendError(err); return; } finally { creating = false; ui.send.disabled = false; }
    }
    ui.composer.value = '';
    autoGrow(ui.composer);
    const userEl = userMessage({ content });
    ui.list.append(userEl);
    streamAnswer({ content }, userEl, (err, live) => { // refused or unreachable: nothing was saved, keep the text
      live.el.remove();
      userEl.remove();
      if (!ui.composer.value.trim()) { ui.composer.value = content; autoGrow(ui.composer); }
      ui.empty.hidden = ui.list.childElementCount > 0;
      updateRegenerate();
      showSendError(err);
    });
  }

  // Shown above the composer, which still holds the text: Retry sends it again.
  function showSendError(err) {
    ui.sendError.replaceChildren(h('span', { text: t('send_failed', { reason: errorText(err) }) }),
      h('button', { id: 'send-retry', type: 'button', class: 'btn', text: t('retry'),
        onclick: () => { ui.sendError.hidden = true; submitComposer(); } }));
    ui.sendError.hidden = false;
  }

  function setStreaming(on) {
    document.body.classList.toggle('streaming', on);
    ui.send.hidden = on;
    ui.stop.hidden = !on;
  }

  function abortStream() { // leave the page's current answer without telling the server to stop
    const live = state.stream;
    if (!live) return;
    state.stream = null;
    live.ctrl.abort();
    setStreaming(false);
  }

  async function stopStream() {
    const live = state.stream;
    if (!live || live.stopped) return;
    live.stopped = true;
    const stop = api('POST', `${convPath(live.convId)}/stop`).catch(() => {});
    await Promise.race([stop, new Promise((r) => setTimeout(r, 1500))]);
    live.ctrl.abort();
  }

  // POST the message and read the SSE answer from the response body (EventSource cannot POST).
  // refused(err, live) runs when the server never started an answer (nothing saved); else errors show in it.
  function streamAnswer(body, userEl = null, refused = null, into = null) {
    const live = startLive(userEl, into?.msgId ?? null, into);
    Object.assign(body, { thinking: ui.thinking.checked });
    if (!ui.effortPicker.hidden && ui.thinking.checked) body.effort = ui.effort.value;
    if (settings.model) body.model = settings.model;
    const temperature = parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    return follow(live, () => request('POST', `${convPath(live.convId)}/messages`, body,
      { signal: live.ctrl.signal }), refused);
  }

  // An answer the server is still writing (the page was reloaded, or left and come back to): the stream sends
  // it from its first word. If it ended meanwhile, the saved one is shown.
  function attach(saved) {
    const live = startLive(null, saved.id);
    return follow(live, () => request('GET', `${convPath(live.convId)}/stream`, undefined,
      { signal: live.ctrl.signal }), (err, l) => {
      if (ui.list.contains(l.el)) l.el.replaceWith(savedAnswer(saved));
      updateRegenerate();
    });
  }

  // A new answer at the end of the list, or (into) an answer already there that goes on from its text.
  function startLive(userEl, id = null, into = null) {
    ui.empty.hidden = true;
    const el = into || assistantMessage(id);
    if (!into) ui.list.append(el);
    for (const old of el.querySelectorAll('.msg-error, .unfinished')) old.remove();
    const live = { el, userEl, convId: state.convId, ctrl: new AbortController(), started: false, done: false,
      stopped: false, thinkStart: null, thinkSeconds: null, renderTimer: null };
    state.stream = live;
    setStreaming(true);
    updateRegenerate();
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    return live;
  }

  async function follow(live, open, refused) {
    const { el } = live;
    try {
      const res = await open();
      if (!res.ok) throw await apiError(res);
      await readEvents(res.body, (ev) => onEvent(live, ev));
    } catch (err) {
      if (err.name === 'AbortError') { /* left for another chat, or stopped */ } else if (!live.started && refused) {
        if (state.stream === live) { state.stream = null; setStreaming(false); }
        refused(err, live);
        return;
      } else showError(el, errorText(err));
    } finally {
      clearTimeout(live.renderTimer);
    }
    if (ui.list.contains(el)) renderLive(live, true);
    closeReasoning(el, live.thinkSeconds ?? thinkingSoFar(live));
    if (!live.done) markUnfinished(el);
    if (state.stream === live) { state.stream = null; setStreaming(false); }
    if (ui.list.contains(el)) { // still on screen (not left for another chat or signed out)
      updateRegenerate();
      loadConversations(); // new title, newest first
    }
  }
  const thinkingSoFar = (live) => (live.thinkStart === null ? null : (performance.now() - live.thinkStart) / 1000);

  // A small SSE reader: lines "data: …" accumulate until a blank line ends the event.
  async function readEvents(stream, onData) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '', data = [];
    const line = (text) => {
      if (text === '') {
        if (data.length) { const payload = data.join('\n'); data = []; dispatch(payload); }
      } else if (text.startsWith('data:')) {
        data.push(text.slice(text[5] === ' ' ? 6 : 5));
      } // comments (":keep-alive") and other fields are ignored
    };
    const dispatch = (payload) => {
      if (payload === '[DONE]') return;
      try { onData(JSON.parse(payload)); } catch (err) { console.warn('bad event', payload, err); }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r\n|\r(?!$)|\n/); // a trailing \r may be half of a \r\n: keep it
      buffer = lines.pop();
      lines.forEach(line);
    }
    line(buffer.replace(/\r$/, ''));
    line('');
  }

  function onEvent(live, ev) {
    const { el } = live;
    switch (ev.type) {
      case 'start':
        live.started = true;
        if (ev.left_out) el.actions.prepend(h('span', { class: 'left-out', text: t('left_out') }));
        if (ev.assistant_message_id != null) {
          el.dataset.id = ev.assistant_message_id;
          el.msgId = ev.assistant_message_id;
          setVersions(el, ev.versions?.[ev.assistant_message_id]);
        }
        if (live.userEl && ev.user_message_id != null) {
          live.userEl.dataset.id = ev.user_message_id;
          live.userEl.msgId = ev.user_message_id;
          setVersions(live.userEl, ev.versions?.[ev.user_message_id]);
        }
        if (ev.continued) { // the answer so far, which this stream goes on from
          el.raw = { content: ev.continued.content || '', reasoning: ev.continued.reasoning || '' };
          if (el.raw.reasoning) el.reasoning.hidden = false;
          renderLive(live, false);
        }
        if (ev.title && String(live.convId) === String(state.convId)) {
          setTitle(ev.title);
          const conv = state.convs.find((c) => String(c.id) === String(live.convId));
          if (conv) { conv.title = ev.title; renderConvList(); }
        }
        break;
      case 'reasoning':
        if (live.thinkStart === null) {
          live.thinkStart = performance.now();
          el.reasoning.hidden = false;
          el.reasoning.open = true;
          el.reasoning.classList.add('live');
        }
        el.raw.reasoning += ev.text || '';
        scheduleRender(live);
        break;
      case 'content':
        if (live.thinkStart !== null && live.thinkSeconds === null) { // the first answer token ends thinking
          live.thinkSeconds = (performance.now() - live.thinkStart) / 1000;
          closeReasoning(el, live.thinkSeconds);
        }
        el.raw.content += ev.text || '';
        scheduleRender(live);
        break;
      case 'done':
        live.done = true;
        el.finishReason = ev.finish_reason;
        if (typeof ev.reasoning_seconds === 'number') live.thinkSeconds = ev.reasoning_seconds; // the server's count wins
        closeReasoning(el, live.thinkSeconds ?? thinkingSoFar(live));
        break;
      case 'error':
        showError(el, ev.message || t('error_generic'));
        break;
    }
  }

  // Re-rendering the whole answer on each token is wasteful; ten times a second is plenty.
  function scheduleRender(live) {
    if (!live.renderTimer) live.renderTimer = setTimeout(() => { live.renderTimer = null; renderLive(live, false); }, 100);
  }
  function renderLive(live, final) {
    const box = ui.scroller;
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 80; // follow only if already at the bottom
    const { el } = live;
    if (el.raw.reasoning) renderMarkdown($('.reasoning-body', el), el.raw.reasoning, final);
    renderMarkdown(el.content, el.raw.content, final);
    if (stick) box.scrollTop = box.scrollHeight;
  }

  function showError(el, text) {
    el.content.after(h('p', { class: 'msg-error', role: 'alert', text }));
  }

  // ------------------------------------------------------------------ account

  function openAccount() {
    $('#account-panel')?.remove();
    const status = h('p', { id: 'account-status', class: 'note', role: 'status' });
    const say = (text, bad = false) => { status.textContent = text; status.classList.toggle('form-error', bad); };
    const name = h('input', { id: 'account-name', type: 'text', value: state.me.name || '', maxlength: 200 });
    const instructions = h('textarea', { id: 'account-instructions', rows: 5, maxlength: 4000,
      placeholder: t('custom_instructions_hint') });
    instructions.value = state.me.instructions || '';
    const current = h('input', { id: 'account-current', type: 'password', autocomplete: 'current-password' });
    const fresh = h('input', { id: 'account-new', type: 'password', autocomplete: 'new-password', minlength: 8,
      placeholder: t('password_hint') });
    const save = async () => {
      try {
        state.me = (await api('PATCH', '/api/me', { name: name.value, instructions: instructions.value })).user;
        $('#user-name').textContent = state.me.name || state.me.email;
        say(t('saved'));
      } catch (err) { say(errorText(err), true); }
    };
    const changePassword = async () => {
      if (fresh.value.length < 8) { say(t('error_password_short'), true); return; }
      try {
        await api('POST', '/api/auth/password', { current_password: current.value, new_password: fresh.value });
        current.value = fresh.value = '';
        say(t('password_changed'));
      } catch (err) { say(errorText(err), true); }
    };
    const signOutAll = async () => {
      try { await api('POST', '/api/auth/signout-all'); } catch (err) { say(errorText(err), true); return; }
      dialog.close();
      abortStream();
      history.replaceState(null, '', location.pathname);
      boot();
    };
    const dialog = h('dialog', { id: 'account-panel' },
      h('div', { class: 'dialog-head' }, h('h2', { text: t('account') }),
        h('button', { id: 'account-close', type: 'button', class: 'icon-btn', text: '✕', 'aria-label': t('close'),
          onclick: () => dialog.close() })),
      h('label', { class: 'field', for: 'account-name' }, h('span', { text: t('name') }), name),
      h('label', { class: 'field', for: 'account-instructions' }, h('span', { text: t('custom_instructions') }),
        instructions),
      h('button', { id: 'account-save', type: 'button', class: 'btn primary', text: t('save'), onclick: save }),
      state.me.has_password ? h('div', { class: 'account-password' }, h('h3', { text: t('change_password') }),
        h('label', { class: 'field', for: 'account-current' }, h('span', { text: t('current_password') }), current),
        h('label', { class: 'field', for: 'account-new' }, h('span', { text: t('new_password') }), fresh),
        h('button', { id: 'account-password-save', type: 'button', class: 'btn', text: t('change_password'),
          onclick: changePassword })) : null,
      h('h3', { text: t('sign_out_everywhere') }),
      h('button', { id: 'account-signout-all', type: 'button', class: 'btn danger', text: t('sign_out_everywhere'),
        onclick: signOutAll }),
      status);
    document.body.append(dialog);
    dialog.showModal();
  }

  // ------------------------------------------------------------------ admin

  async function openAdmin() {
    let dialog = $('#admin-panel');
    if (!dialog) {
      const signupSwitch = h('input', { id: 'admin-signup-open', type: 'checkbox', checked: state.signupOpen,
        onchange: async () => {
          const open = signupSwitch.checked;
          try {
            await api('PATCH', '/api/admin/settings', { signup_open: open });
            state.signupOpen = open;
          } catch (err) { signupSwitch.checked = !open; toast(errorText(err)); }
        } });
      dialog = h('dialog', { id: 'admin-panel' },
        h('div', { class: 'dialog-head' }, h('h2', { text: t('admin') }),
          h('button', { id: 'admin-close', type: 'button', class: 'icon-btn', text: '✕', 'aria-label': t('close'),
            onclick: () => dialog.close() })),
        h('label', { class: 'switch', for: 'admin-signup-open' }, signupSwitch, h('span', { text: t('signup_open') })),
        h('h3', { text: t('users') }),
        h('table', { id: 'admin-users' }));
      document.body.append(dialog);
    }
    dialog.showModal();
    const table = $('#admin-users');
    table.replaceChildren(h('tr', {}, h('td', { text: t('loading') })));
    try {
      const users = await api('GET', '/api/admin/users');
      table.replaceChildren(h('tr', {}, ...['name', 'email', 'status', 'usage', ''].map((k) => h('th', { text: k && t(k) }))),
        ...users.map(userRow));
    } catch (err) { table.replaceChildren(h('tr', {}, h('td', { class: 'form-error', text: errorText(err) }))); }
  }

  function userRow(user) {
    const row = h('tr', { class: 'admin-user' + (user.disabled ? ' disabled' : ''), 'data-id': user.id },
      h('td', { text: (user.name || '') + (user.is_admin ? ` (${t('admin')})` : '') }),
      h('td', { text: user.email || '' }),
      h('td', { class: 'admin-status', text: user.disabled ? t('disabled') : t('active') }),
      h('td', { class: 'admin-usage', text: t('usage_line', user.usage || {}) }),
      h('td', {}, h('button', { type: 'button', class: 'btn admin-toggle',
        text: user.disabled ? t('enable') : t('disable'),
        disabled: String(user.id) === String(state.me.id), // no locking yourself out
        onclick: async () => {
          try {
            await api('PATCH', `/api/admin/users/${enc(user.id)}`, { disabled: !user.disabled });
            user.disabled = !user.disabled;
            row.replaceWith(userRow(user));
          } catch (err) { toast(errorText(err)); }
        } })));
    return row;
  }

  boot();
})();
