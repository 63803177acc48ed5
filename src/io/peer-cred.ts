// TEMPORARY placeholder until h-peercred merges
import type { Socket } from 'node:net';
export interface PeerCredentials { readonly pid: number; readonly uid: number; readonly gid: number }
export function peerCredentials(_s: Socket): PeerCredentials | null { return null; }
export function peerCredentialsUnavailable(): string | null { return 'placeholder'; }
