// Markdown to DOM, and a small code highlighter.
//
// Everything is built with createElement and text nodes: no string of the model's (or the
// user's) ever becomes HTML, so `<script>` in a reply is shown as text. Links keep http(s)
// and mailto targets only. Rendering is a pure function of the text, so a streamed message
// is simply rendered again as it grows (an unclosed code fence renders as an open block).

const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

// -- code highlighting -----------------------------------------------------------------------

const words = (s) => new Set(s.split(" "));
const C_LIKE = "if else for while do switch case default break continue return goto sizeof " +
  "struct union enum typedef static const extern inline void char short int long float " +
  "double signed unsigned bool auto register volatile";
const LANGUAGES = {
  python: { line: "#", keywords: words("False None True and as assert async await break class " +
    "continue def del elif else except finally for from global if import in is lambda match " +
    "case nonlocal not or pass raise return try while with yield self"),
    triple: true },
  javascript: { line: "//", block: true, backtick: true, keywords: words("async await break case " +
    "catch class const continue debugger default delete do else export extends false finally " +
    "for function if import in instanceof let new null of return static super switch this " +
    "throw true try typeof undefined var void while with yield interface type enum implements " +
    "private public protected readonly as") },
  json: { keywords: words("true false null") },
  bash: { line: "#", keywords: words("if then else elif fi for while until do done case esac " +
    "function in return export local echo cd exit set unset source sudo") },
  c: { line: "//", block: true, keywords: words(C_LIKE + " NULL true false include define") },
  cpp: { line: "//", block: true, keywords: words(C_LIKE + " class namespace template " +
    "typename public private protected virtual override new delete this nullptr true false " +
    "using constexpr noexcept try catch throw std include define") },
  rust: { line: "//", block: true, keywords: words("as async await break const continue crate " +
    "dyn else enum extern false fn for if impl in let loop match mod move mut pub ref return " +
    "self Self static struct super trait true type unsafe use where while Some None Ok Err") },
  go: { line: "//", block: true, backtick: true, keywords: words("break case chan const " +
    "continue default defer else fallthrough for func go goto if import interface map package " +
    "range return select struct switch type var nil true false") },
  java: { line: "//", block: true, keywords: words("abstract boolean break byte case catch char " +
    "class const continue default do double else enum extends final finally float for if " +
    "implements import instanceof int interface long new null package private protected " +
    "public return short static super switch this throw throws try void while true false var") },
  swift: { line: "//", block: true, keywords: words("class struct enum protocol extension func " +
    "let var if else guard switch case default for in while repeat return break continue " +
    "import self Self nil true false init deinit throws throw try catch async await public " +
    "private internal static") },
  sql: { line: "--", keywords: words("select from where and or not insert into values update " +
    "set delete create table drop alter index join left right inner outer on group by order " +
    "having limit as null is in like distinct union all primary key SELECT FROM WHERE AND OR " +
    "NOT INSERT INTO VALUES UPDATE SET DELETE CREATE TABLE DROP JOIN ON GROUP BY ORDER LIMIT AS") },
};
const ALIASES = { py: "python", js: "javascript", ts: "javascript", typescript: "javascript",
  jsx: "javascript", tsx: "javascript", sh: "bash", shell: "bash", zsh: "bash", console: "bash",
  "c++": "cpp", cc: "cpp", h: "c", hpp: "cpp", rs: "rust", golang: "go", kotlin: "java" };

const patterns = new Map();

function pattern(spec) {
  if (patterns.has(spec)) return patterns.get(spec);
  const comments = [];
  if (spec.block) comments.push(String.raw`\/\*[\s\S]*?(?:\*\/|$)`);
  if (spec.line) comments.push(spec.line.replace(/[/\\^$*+?.()|[\]{}-]/g, "\\$&") + ".*");
  const strings = [String.raw`"(?:\\[\s\S]|[^"\\\n])*"?`, String.raw`'(?:\\[\s\S]|[^'\\\n])*'?`];
  if (spec.triple) {
    strings.unshift(String.raw`"""[\s\S]*?(?:"""|$)`, String.raw`'''[\s\S]*?(?:'''|$)`);
  }
  if (spec.backtick) strings.push(String.raw`\`(?:\\[\s\S]|[^\`\\])*\`?`);
  const parts = [
    comments.length ? `(${comments.join("|")})` : "(?!)",
    `(${strings.join("|")})`,
    String.raw`(\b(?:0[xob][\da-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\b)`,
    String.raw`([A-Za-z_$][\w$]*)`,
  ];
  const re = new RegExp(parts.join("|"), "g");
  patterns.set(spec, re);
  return re;
}

// Fill `code` with the text of `source`, keywords, strings, comments and numbers in spans.
export function highlight(code, source, language) {
  const spec = LANGUAGES[ALIASES[language] || language];
  if (!spec) {
    code.textContent = source;
    return;
  }
  const re = pattern(spec);
  re.lastIndex = 0;
  let at = 0;
  for (let m; (m = re.exec(source)); ) {
    if (m.index > at) code.append(source.slice(at, m.index));
    const [text, comment, string, number, word] = m;
    const kind = comment ? "comment" : string ? "string" : number ? "number"
      : word && spec.keywords.has(word) ? "keyword" : null;
    code.append(kind ? el("span", `tok-${kind}`, text) : text);
    at = m.index + text.length;
  }
  if (at < source.length) code.append(source.slice(at));
}

function codeBlock(language, source) {
  const box = el("div", "code");
  const head = el("div", "code-head");
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.dataset.code = source;  // app.js copies it (one listener for the whole page)
  head.append(el("span", "code-lang", language || "text"), copy);
  const pre = el("pre");
  const code = el("code", language ? `lang-${language}` : "");
  highlight(code, source, language.toLowerCase());
  pre.append(code);
  box.append(head, pre);
  return box;
}

// -- inline ------------------------------------------------------------------------------------

const INLINE = new RegExp([
  String.raw`(\`+)([\s\S]+?)\1`,                                  // 1-2 code span
  String.raw`\[([^\]\n]+)\]\(\s*(\S+?)(?:\s+"[^"]*")?\s*\)`,       // 3-4 link
  String.raw`(\*\*|__)(?=\S)([\s\S]*?\S)\5`,                       // 5-6 strong
  String.raw`(\*|_)(?=\S)([\s\S]*?\S)\7(?!\w)`,                    // 7-8 emphasis
  String.raw`~~(?=\S)([\s\S]*?\S)~~`,                              // 9 strikethrough
  String.raw`(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])`,            // 10 bare link
].join("|"), "g");

function safeHref(url) {
  try {
    const parsed = new URL(url, location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(text, url) {
  const href = safeHref(url);
  if (!href) return document.createTextNode(text);
  const a = el("a", null, text);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

function inline(parent, text) {
  const re = new RegExp(INLINE.source, "g");
  let at = 0;
  for (let m; (m = re.exec(text)); ) {
    if (m.index > at) parent.append(text.slice(at, m.index));
    if (m[1]) parent.append(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
    else if (m[3]) parent.append(link(m[3], m[4]));
    else if (m[5]) inline(parent.appendChild(el("strong")), m[6]);
    else if (m[7]) inline(parent.appendChild(el("em")), m[8]);
    else if (m[9]) inline(parent.appendChild(el("del")), m[9]);
    else parent.append(link(m[10], m[10]));
    at = m.index + m[0].length;
  }
  if (at < text.length) parent.append(text.slice(at));
}

function paragraph(parent, lines) {
  const p = el("p");
  lines.forEach((line, i) => {
    if (i) p.append(el("br"));
    inline(p, line.replace(/\s+$/, ""));
  });
  parent.append(p);
}

// -- blocks ------------------------------------------------------------------------------------

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?: +|$)/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

const startsBlock = (line) => FENCE.test(line) || HEADING.test(line) || RULE.test(line) ||
  QUOTE.test(line) || ITEM.test(line);

function cells(row) {
  // Cells split at pipes not escaped as \| (which a cell, or code in it, may then hold).
  return row.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "").split(/(?<!\\)\|/)
    .map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(parent, lines) {
  const t = el("table");
  const head = t.appendChild(el("thead")).appendChild(el("tr"));
  const align = cells(lines[1]).map((c) =>
    c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : "");
  cells(lines[0]).forEach((c, i) => {
    const th = head.appendChild(el("th"));
    if (align[i]) th.style.textAlign = align[i];
    inline(th, c);
  });
  const body = t.appendChild(el("tbody"));
  for (const row of lines.slice(2)) {
    const tr = body.appendChild(el("tr"));
    cells(row).forEach((c, i) => {
      const td = tr.appendChild(el("td"));
      if (align[i]) td.style.textAlign = align[i];
      inline(td, c);
    });
  }
  const wrap = el("div", "table-wrap");
  wrap.append(t);
  parent.append(wrap);
}

function list(parent, lines, start) {
  // Items start at the first item's indent; deeper lines belong to the item above.
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  let item = null;
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
      item = [line.slice(m[0].length)];
      node.append(el("li"));
      node.lastChild.lines = item;
    } else if (line.trim() === "") {
      const next = lines[i + 1];
      if (next === undefined || (!/^\s/.test(next) && !ITEM.test(next))) break;
      item.push("");
    } else if (/^\s/.test(line) && line.search(/\S/) > indent) {
      item.push(line.slice(Math.min(line.search(/\S/), indent + 2 + (ordered ? 1 : 0))));
    } else if (!startsBlock(line) && item.length && item[item.length - 1] !== "") {
      item.push(line);  // a lazy continuation of the item's paragraph
    } else {
      break;
    }
    i++;
  }
  for (const li of node.children) {
    blocks(li, li.lines, true);
    delete li.lines;
  }
  parent.append(node);
  return i;
}

function blocks(parent, lines, tight = false) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;
      parent.append(codeBlock(m[2], body.join("\n")));
    } else if (line.trim() === "") {
      i++;
    } else if ((m = HEADING.exec(line))) {
      inline(parent.appendChild(el(`h${m[1].length}`)), m[2]);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) {
        quoted.push(lines[i].replace(QUOTE, ""));
      }
      blocks(parent.appendChild(el("blockquote")), quoted);
    } else if (ITEM.test(line)) {
      i = list(parent, lines, i);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
               lines[i + 1].includes("-")) {
      const rows = [];
      for (; i < lines.length && lines[i].includes("|"); i++) rows.push(lines[i]);
      table(parent, rows);
    } else {
      const text = [];
      const more = () => lines[i].trim() !== "" && !(text.length && startsBlock(lines[i]));
      for (; i < lines.length && more(); i++) text.push(lines[i]);
      if (tight && parent.tagName === "LI" && !parent.childNodes.length) {
        text.forEach((t, k) => { if (k) parent.append(el("br")); inline(parent, t); });
      } else {
        paragraph(parent, text);
      }
    }
  }
}

// Replace the contents of `container` with `source` rendered as Markdown.
export function renderMarkdown(container, source) {
  const fragment = document.createDocumentFragment();
  blocks(fragment, source.replace(/\r\n?/g, "\n").split("\n"));
  container.replaceChildren(fragment);
}

// Where `source` can be cut so that the part before renders the same alone: after a blank
// line outside a code fence whose next line (complete, so known) starts a new block that no
// list item or quote goes on into.
function finishedUpTo(source) {
  let cut = 0;
  let fence = null;
  let blank = -1;  // the end of the last blank line outside a fence
  let at = 0;
  for (let end; (end = source.indexOf("\n", at)) >= 0; at = end + 1) {
    const line = source.slice(at, end);
    const m = FENCE.exec(line);
    if (fence) {
      if (new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`).test(line)) fence = null;
      continue;
    }
    if (line.trim() === "") {
      blank = end + 1;
      continue;
    }
    if (blank === at && !/^\s/.test(line) && !ITEM.test(line)) cut = at;
    blank = -1;
    if (m) fence = m[1];
  }
  return cut;
}

// A growing text (a streamed reply) rendered as it grows: the blocks it has finished are
// rendered once and kept, only the rest is rendered again on each update.
export class StreamingMarkdown {
  constructor(container) {
    this.finished = "";
    this.done = el("div", "md-part");
    this.rest = el("div", "md-part");
    container.replaceChildren(this.done, this.rest);
  }

  update(source) {
    source = source.replace(/\r\n?/g, "\n");
    if (!source.startsWith(this.finished)) {  // not a continuation: start again
      this.finished = "";
      this.done.replaceChildren();
    }
    const cut = finishedUpTo(source);
    if (cut > this.finished.length) {
      const fragment = document.createDocumentFragment();
      blocks(fragment, source.slice(this.finished.length, cut).split("\n"));
      this.done.append(fragment);
      this.finished = source.slice(0, cut);
    }
    renderMarkdown(this.rest, source.slice(this.finished.length));
  }
}
