// The two DOM helpers both views use.
export const $ = (id) => document.getElementById(id);

// a new element with a class and text (text, never HTML: answers and names are shown as typed)
export function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}
