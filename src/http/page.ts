/** The status page (filled in below). */
export function statusPage(): string {
  return '<!doctype html><title>blockgate</title><p>blockgate status page</p>\n';
}
